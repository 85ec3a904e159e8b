"""Security: no secret in any log, record, envelope, error or Redis key; no path traversal.

The secrets are distinctive strings (S3 keys, the webhook token, a Redis password, credentials
in a destination URL). A real worker, the HTTP API and the CLI run a succeeding job, failing
ones (missing object, S3 unreachable, an invalid request) and a delivery that is retried;
then every byte they produced is searched. Compose (Flower basic auth, loopback ports) is
covered by tests/test_docker.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import S3Server, free_port, generate_media, start_moto, wait_for
from test_faults import (
    HookServer,
    RedisServer,
    TcpProxy,
    dlq_envelopes,
    object_names,
    settings_for,
    wait_finished,
)
from workers import FAST_ENV, Worker

from transcoder import engine, keys, service
from transcoder.errors import RequestError
from transcoder.models import JobRequest, JobState
from transcoder.settings import Settings

SECRETS = {
    "TRANSCODER_S3_ACCESS_KEY": "sekret-access-XYZ",
    "TRANSCODER_S3_SECRET_KEY": "sekret-s3-XYZ",
    "TRANSCODER_WEBHOOK_TOKEN": "sekret-hook-XYZ",
}
REDIS_PASSWORD = "sekret-redis-XYZ"
DESTINATION_PASSWORD = "sekret-dest-XYZ"
DESTINATION_TOKEN = "sekret-query-XYZ"
ALL_SECRETS = (*SECRETS.values(), REDIS_PASSWORD, DESTINATION_PASSWORD, DESTINATION_TOKEN)
CLI = [sys.executable, "-c", "from transcoder.cli import main; main()"]


def base_request(**fields: Any) -> dict[str, Any]:
    return {"bucket": "my-bucket", "object": "480P.mp4", "dst_format": "mov", **fields}


# --- path traversal: the request model ------------------------------------------------------


@pytest.mark.parametrize(
    "output_dir",
    ["../x", "/abs", "/", "a/../../b", "a/..", "..", "./a", "a/./b", "a\nb", "a\rb", "a\x00b",
     "a\tb", "a\x1bb", "a\x7fb"],
)  # fmt: skip
def test_unsafe_output_dir_is_refused(output_dir: str) -> None:
    with pytest.raises(RequestError) as refused:
        service.parse_request(base_request(output_dir=output_dir))
    assert "output_dir" in str(refused.value)


@pytest.mark.parametrize("output_dir", ["a", "a/b/c", "", "with space/ünï", "a/b/"])
def test_safe_output_dir_is_accepted(output_dir: str) -> None:
    assert service.parse_request(base_request(output_dir=output_dir)).output_dir == (
        output_dir.rstrip("/")
    )


@pytest.mark.parametrize(
    "object_key",
    ["../../etc/passwd.mp4", "/etc/passwd", "a/../../b.mp4", "..\\..\\w.mp4", "...mp4",
     "%2e%2e%2fx.mp4", "dir/.hidden.mp4", "-i.mp4", "file:x.mp4"],
)  # fmt: skip
def test_hostile_object_names_only_ever_name_a_file_inside_the_output_prefix(
    object_key: str,
) -> None:
    """The stem becomes a local file name and an output key: never a path of its own."""
    try:
        request = JobRequest.model_validate(base_request(object=object_key, output_dir="out"))
    except ValueError:
        return  # refused outright: harmless
    stem = request.stem
    assert "/" not in stem and "\x00" not in stem, stem
    key = request.output_key(f"{stem}.mov")
    assert key.startswith("out/") and ".." not in key.split("/"), key


@pytest.mark.parametrize("stem", ["..", ".", "../x", "a/b", "/etc/passwd", "x\x00y", ""])
def test_the_engine_refuses_a_stem_that_is_a_path(
    stem: str, tmp_path: Path, ffmpeg_available: None
) -> None:
    source = generate_media(tmp_path / "in.mp4", duration_s=0.5, size="64x48")
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(RequestError):
        engine.transcode(source, out, stem=stem, formats=["mp4"])

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "encoded_key",
    ["..%2F..%2Fetc%2Fpasswd.mp4", "up/..%2F..%2F..%2Fx.mp4", "up/%2E%2E/%2E%2E/y.mp4",
     "up/a%0Ab.mp4", "%2Fabs%2Fz.mp4", "up/..%5C..%5Cw.mp4", "up/%00.mp4"],
)  # fmt: skip
def test_an_upload_event_cannot_steer_outputs_out_of_the_rule_prefix(encoded_key: str) -> None:
    """Object-upload triggers: `{dir}` and `{stem}` come from the uploader's key."""
    from transcoder import triggers

    rules = triggers.parse_rules(
        [{"bucket": "uploads", "dst_formats": ["mp4"], "output_dir": "converted/{dir}/{stem}"}]
    )
    body = {
        "Records": [
            {
                "eventName": "s3:ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": "uploads"},
                    "object": {"key": encoded_key, "eTag": "abc", "size": 10},
                },
            }
        ]
    }
    (event,) = triggers.parse_event(body)

    decision = triggers.plan_jobs(event, rules)

    for request in decision.requests:  # none at all (refused) is fine too
        segments = request.output_dir.split("/")
        assert segments[0] == "converted" and ".." not in segments, request.output_dir
        assert not any(ord(char) < 32 or ord(char) == 127 for char in request.output_dir)
        key = request.output_key(f"{request.stem}.mp4")
        assert key.startswith("converted/") and ".." not in key.split("/"), key


# --- the service: one worker, the API and the CLI with distinctive secrets ------------------


class Service:
    def __init__(
        self,
        env: dict[str, str],
        settings: Settings,
        moto: S3Server,
        proxy: TcpProxy,
        worker: Worker,
        hook: HookServer,
        api_url: str,
        api_log: Path,
        root: Path,
    ) -> None:
        self.env, self.settings, self.moto, self.proxy = env, settings, moto, proxy
        self.worker, self.api_url, self.api_log, self.root = worker, api_url, api_log, root
        self.hook = hook
        self.cli_output: list[str] = []

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or self.env)},
            stdin=subprocess.DEVNULL,
        )
        self.cli_output += [result.stdout, result.stderr]
        return result


@pytest.fixture(scope="module")
def secure_service(
    ffmpeg_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("secure")
    redis_server = RedisServer(root / "redis", password=REDIS_PASSWORD).start()
    moto = start_moto()  # moto takes any credentials, so the distinctive ones work
    proxy = TcpProxy(moto.port)
    work = root / "jail" / "work"
    work.mkdir(parents=True)
    # every job's first success delivery fails, so a retry (and its message) is pending
    hook = HookServer(failures=1, per_job=True)
    hook_address = hook.url.removeprefix("http://").split("/", 1)[0]
    destination = (
        f"http://hookuser:{DESTINATION_PASSWORD}@{hook_address}/hooks/transcoded"
        f"?token={DESTINATION_TOKEN}"
    )
    env = {
        **FAST_ENV,
        **SECRETS,
        "TRANSCODER_S3_ENDPOINT": proxy.endpoint,
        "TRANSCODER_REDIS_URL": redis_server.url(),
        "TRANSCODER_WORK_DIR": str(work),
        "TRANSCODER_ON_SUCCESS": destination,
        "TRANSCODER_MAX_RETRIES": "1",
        "TRANSCODER_RETRY_MIN_BACKOFF_S": "1",
        "TRANSCODER_RETRY_MAX_BACKOFF_S": "1",
    }
    settings = settings_for(env)
    worker = Worker("secure", env, root).start()
    api_port = free_port()
    api_log = root / "api.log"
    with api_log.open("wb") as log:
        api = subprocess.Popen(
            [*CLI, "api", "--port", str(api_port), "--log-level", "debug"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    api_url = f"http://127.0.0.1:{api_port}"

    def api_up() -> bool:
        assert api.poll() is None, api_log.read_text()
        try:
            return httpx.get(f"{api_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        worker.wait_ready()
        wait_for(api_up, 30, "the API to answer", interval_s=0.2)
        client = moto.client()
        client.make_bucket("secure")
        source = generate_media(root / "clip.mp4", duration_s=1, size="160x120")
        for key in ("clip.mp4", "/abs/clip.mp4", "...mp4", "..\\..\\w.mp4"):
            client.fput_object("secure", key, str(source))
        yield Service(env, settings, moto, proxy, worker, hook, api_url, api_log, root)
    finally:
        hook.close()
        api.terminate()
        api.wait(10)
        worker.stop()
        moto.process.terminate()
        moto.process.wait(10)
        redis_server.stop()


def submit(svc: Service, job_id: str, **fields: Any) -> str:
    request = {
        "bucket": "secure",
        "object": "clip.mp4",
        "output_dir": job_id,
        "dst_formats": ["mp4", "m3u8"],
        "invocation_id": job_id,
        **fields,
    }
    assert service.submit(request, settings=svc.settings).created
    return job_id


def redis_dump(svc: Service) -> str:
    """Every key and value in the service's Redis (Celery message bodies decoded)."""
    client = service.get_store(svc.settings).client
    parts: list[str] = []
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        values: list[Any]
        if kind == "string":
            values = [client.get(key)]
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "hash":
            values = [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        elif kind == "stream":
            values = [str(entry) for entry in client.xrange(key)]
        else:
            values = []
        parts.append(key)
        for value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            parts.append(text)
            parts.extend(_decoded_bodies(text))
    return "\n".join(parts)


def _decoded_bodies(text: str) -> list[str]:
    """kombu keeps a message body base64-encoded inside its JSON: decode it for the search."""
    found = []
    for candidate in (text, *_json_strings(text)):
        try:
            message = json.loads(candidate)
        except ValueError:
            continue
        messages = message if isinstance(message, list) else [message]
        for item in messages:
            if isinstance(item, dict) and isinstance(item.get("body"), str):
                try:
                    found.append(base64.b64decode(item["body"]).decode(errors="replace"))
                except ValueError:
                    found.append(item["body"])
    return found


def _json_strings(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [json.dumps(item) for item in value] if isinstance(value, list) else []


def leaks(text: str) -> list[str]:
    return [secret for secret in ALL_SECRETS if secret in text]


def test_traversal_through_the_service_is_refused_or_harmless(secure_service: Service) -> None:
    svc = secure_service
    jail = svc.root / "jail"

    # submission refuses it before a job exists
    with pytest.raises(RequestError):
        service.submit(
            {**base_request(bucket="secure", object="clip.mp4"), "output_dir": "../../x"},
            settings=svc.settings,
        )
    # a Celery client that skips validation: the worker refuses it, records and delivers it
    celery = service.celery_app(svc.settings)
    hostile = {
        "bucket": "secure",
        "object": "clip.mp4",
        "output_dir": "../../escaped",
        "dst_format": "mp4",
        "invocation_id": "celery_traversal",
    }
    celery.send_task(service.TASK_NAME, args=[hostile], exchange="", routing_key=keys.QUEUE)
    # hostile object names: a leading '/', backslashes, dots, and '..' segments
    jobs = {
        "abs_key": submit(svc, "abs_key", object="/abs/clip.mp4", output_dir="safe"),
        "dots_key": submit(svc, "dots_key", object="...mp4", output_dir="safe"),
        "backslash_key": submit(svc, "backslash_key", object="..\\..\\w.mp4", output_dir="safe"),
        "dotdot_key": submit(svc, "dotdot_key", object="../../etc/passwd.mp4", output_dir="safe"),
    }

    invalid = wait_finished(svc.settings, "celery_traversal", timeout_s=60)
    assert invalid.state == JobState.INVALID
    refused = wait_for(
        lambda: dlq_envelopes(svc.settings, invalid.id), 20, "the InvalidRequest envelope"
    )
    assert [e["requestContext"]["condition"] for e in refused] == ["InvalidRequest"]
    finals = {name: wait_finished(svc.settings, job_id, 60) for name, job_id in jobs.items()}
    assert finals["abs_key"].state == JobState.SUCCEEDED, finals["abs_key"].error
    assert finals["backslash_key"].state == JobState.SUCCEEDED, finals["backslash_key"].error
    # every output key is inside the job's prefix; nothing escaped the work dir on disk
    keys_written = object_names(svc.moto, "secure", "")
    sources = {"clip.mp4", "/abs/clip.mp4", "...mp4", "..\\..\\w.mp4"}
    outputs = [key for key in keys_written if key not in sources]
    assert all(key.startswith("safe/") for key in outputs), outputs
    assert not any(".." in key.split("/") for key in outputs), outputs
    assert [p.name for p in jail.iterdir()] == ["work"]
    assert list((jail / "work").iterdir()) == []
    assert not (svc.root / "escaped").exists()
    # names the storage client or the engine cannot take: refused, classified, delivered
    for name in ("dots_key", "dotdot_key"):
        final = finals[name]
        if final.state != JobState.SUCCEEDED:  # refused is fine, but classified, not a bug
            assert final.error is not None
            assert final.error.type not in ("InternalError",), (name, final.error)
            envelope = wait_for(
                lambda final=final: dlq_envelopes(svc.settings, final.id), 20, "an envelope"
            )[-1]
            assert envelope["responseContext"]["functionError"] == "Handled", (name, envelope)


def test_no_secret_in_logs_records_envelopes_errors_or_redis(
    secure_service: Service, tmp_path: Path
) -> None:
    svc = secure_service
    ok = submit(svc, "secret_ok")
    missing = submit(svc, "secret_missing", object="nope/missing.mp4")
    done = wait_finished(svc.settings, ok, 60)
    assert done.state == JobState.SUCCEEDED, done.error
    assert wait_finished(svc.settings, missing, 60).state == JobState.FAILED
    # while the delivery retry is pending, its message sits in Redis
    wait_for(lambda: len(svc.hook.for_job(ok)) >= 1, 20, "the first delivery attempt")
    during_retry = redis_dump(svc)
    wait_for(lambda: len(svc.hook.for_job(ok)) >= 2, 30, "the retried delivery")
    # S3 unreachable: retried, then failed with a storage error
    svc.proxy.down()
    try:
        unreachable = submit(svc, "secret_s3_down")
        gone = wait_finished(svc.settings, unreachable, 60)
    finally:
        svc.proxy.up()
    assert gone.state == JobState.FAILED and gone.error is not None
    assert gone.error.type == "StorageError", gone.error

    # the CLI and the API show the records, the logs and errors
    ids = (ok, missing, unreachable)
    for job_id in ids:
        assert svc.cli("status", job_id, "--json").returncode == 0
        assert svc.cli("logs", job_id).returncode == 0
    assert svc.cli("list", "--json").returncode == 0
    svc.cli("status", "no_such_job")
    down_redis = {**svc.env, "TRANSCODER_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}
    assert svc.cli("status", ok, env=down_redis).returncode != 0
    api_texts = []
    for path in ("/healthz", "/metrics", f"/jobs/{ok}", f"/jobs/{missing}", f"/jobs/{ok}/logs",
                 "/jobs?limit=50", "/openapi.json"):  # fmt: skip
        api_texts.append(httpx.get(svc.api_url + path, timeout=10).text)
    for token in (None, "wrong-token", SECRETS["TRANSCODER_WEBHOOK_TOKEN"][:-1]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answer = httpx.post(svc.api_url + "/hooks/s3", json={"Records": []}, headers=headers)
        assert answer.status_code in (401, 403)
        api_texts.append(answer.text)

    everything = {
        "worker log": svc.worker.log(),
        "api log": svc.api_log.read_text(errors="replace"),
        "api answers": "\n".join(api_texts),
        "cli output": "\n".join(svc.cli_output),
        "records": "\n".join(
            service.get_job(job_id, settings=svc.settings).model_dump_json() for job_id in ids
        ),
        "dlq": "\n".join(
            json.dumps(e) for job_id in ids for e in dlq_envelopes(svc.settings, job_id)
        ),
        "success envelopes": json.dumps([body for _, body in svc.hook.requests]),
        "redis during a delivery retry": during_retry,
        "redis at the end": redis_dump(svc),
    }
    found = {where: leaks(text) for where, text in everything.items() if leaks(text)}
    assert found == {}, f"secrets leaked: {found}"
    # the searches were not vacuous
    assert "secret_ok" in everything["records"] and "secret_missing" in everything["dlq"]
    assert "celery@" in everything["worker log"] or "ready" in everything["worker log"]
    assert "/hooks/transcoded" in everything["records"]


def test_the_api_listens_on_loopback_only_by_default(secure_service: Service) -> None:
    """`transcoder api` without --host: nothing but 127.0.0.1 can reach it."""
    port = int(secure_service.api_url.rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex


def test_garbage_celery_messages_neither_crash_nor_wedge_the_worker(
    secure_service: Service,
) -> None:
    """Any Celery client can publish to the queue: the worker must shrug off what it gets."""
    svc = secure_service
    celery = service.celery_app(svc.settings)
    garbage: list[dict[str, Any]] = [
        {"args": ["not a request"]},
        {"args": [None]},
        {"args": [[1, 2, 3]]},
        {"args": [{"bucket": "secure"}]},
        {"args": [{**base_request(bucket="secure"), "invocation_id": "../../escape"}]},
        {"kwargs": {"request": base_request(bucket="secure"), "job_id": "../../escape"}},
        {"kwargs": {"request": None, "job_id": "no_such_job"}},
        {"args": [{**base_request(bucket="secure"), "output_dir": "a\x00b"}]},
        {"args": [{**base_request(bucket="secure"), "video_codec": "-f lavfi -i x"}]},
    ]
    for message in garbage:
        celery.send_task(service.TASK_NAME, exchange="", routing_key=keys.QUEUE, **message)

    after = submit(svc, "after_garbage", output_dir="after")
    final = wait_finished(svc.settings, after, timeout_s=60)

    assert final.state == JobState.SUCCEEDED, final.error
    assert svc.worker.alive()
    assert [p.name for p in (svc.root / "jail").iterdir()] == ["work"]
    assert list((svc.root / "jail" / "work").iterdir()) == []
    assert not list(svc.root.rglob("escape*"))
    crashes = [line for line in svc.worker.log().splitlines() if "Traceback" in line]
    assert crashes == [], svc.worker.log()[-3000:]


def test_a_request_cannot_overwrite_or_delete_its_own_source(secure_service: Service) -> None:
    """`{"object": "src/clip.mp4", "output_dir": "src", "dst_format": "mp4"}` names the source
    as its own output: refused, or the source left exactly as it was."""
    svc = secure_service
    client = svc.moto.client()
    client.fput_object("secure", "src/clip.mp4", str(svc.root / "clip.mp4"))
    before = client.stat_object("secure", "src/clip.mp4")
    request = {
        "bucket": "secure",
        "object": "src/clip.mp4",
        "output_dir": "src",
        "dst_formats": ["mp4", "m3u8"],
        "invocation_id": "self_overwrite",
    }
    try:
        service.submit(request, settings=svc.settings)
    except RequestError:
        pass  # refused at submission: the best outcome
    else:
        final = wait_finished(svc.settings, "self_overwrite", timeout_s=60)
        assert final.state in (JobState.SUCCEEDED, JobState.INVALID, JobState.FAILED)

    after = client.stat_object("secure", "src/clip.mp4")
    assert (after.etag, after.size) == (before.etag, before.size), "the source was replaced"


def test_an_unusual_but_valid_key_gives_a_playable_hls_output(secure_service: Service) -> None:
    """SPEC §3: any valid key (spaces, unicode, '%', '+'); the playlist's segment names are
    the uploaded keys next to it (a player resolves them relative to the playlist)."""
    svc = secure_service
    key = "Ünï cödé/my vidéo 100% + more #1.mp4"
    svc.moto.client().fput_object("secure", key, str(svc.root / "clip.mp4"))
    job_id = submit(svc, "odd_key", object=key, output_dir="odd out/ü")

    final = wait_finished(svc.settings, job_id, timeout_s=60)

    assert final.state == JobState.SUCCEEDED, final.error
    keys_written = object_names(svc.moto, "secure", "odd out/ü/")
    playlist_key = "odd out/ü/my vidéo 100% + more #1.m3u8"
    assert playlist_key in keys_written and "odd out/ü/my vidéo 100% + more #1.mp4" in keys_written
    playlist = svc.moto.client().get_object("secure", playlist_key).read().decode()
    segments = [line for line in playlist.splitlines() if line and not line.startswith("#")]
    assert segments
    for name in segments:
        assert name.isascii() and " " not in name and "%" not in name, name  # a valid URI
        assert f"odd out/ü/{name}" in keys_written
