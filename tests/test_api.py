"""The HTTP API and the upload webhook, against the real Redis (the tests' own database).

Without a worker, submitted jobs stay queued: enough for the API's contract. The end-to-end
test at the bottom starts a real Celery worker and a moto S3 server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import ROOT, free_port, wait_for

from transcoder.api import DUPLICATE_HEADER, create_app
from transcoder.settings import Settings

pytestmark = pytest.mark.integration

TOKEN = "test-token-not-a-secret"
RULES = [
    {
        "bucket": "media",
        "prefix": "uploads/",
        "suffix": ".mp4",
        "dst_formats": ["mov"],
        "output_dir": "transcoded/{dir}/{stem}",
    }
]
SEED = {"bucket": "my-bucket", "object": "480P.mp4", "output_dir": "a", "dst_format": "mov"}


def s3_event(
    key: str,
    *,
    bucket: str = "media",
    event_name: str = "s3:ObjectCreated:Put",
    etag: str = "d41d8cd98f00b204e9800998ecf8427e",
    metadata: dict[str, str] | None = None,
) -> dict:
    """A bucket notification as MinIO's webhook target sends it (key URL-encoded)."""
    from urllib.parse import quote_plus

    obj = {
        "key": quote_plus(key, safe="/"),
        "size": 1024,
        "eTag": etag,
        "contentType": "video/mp4",
        "userMetadata": metadata if metadata is not None else {"content-type": "video/mp4"},
        "sequencer": "17A0C0FFEE000001",
    }
    return {
        "EventName": event_name,
        "Key": f"{bucket}/{key}",
        "Records": [
            {
                "eventVersion": "2.0",
                "eventSource": "minio:s3",
                "awsRegion": "",
                "eventTime": "2026-11-27T05:00:00.000Z",
                "eventName": event_name,
                "userIdentity": {"principalId": "minioadmin"},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "Config",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": obj,
                },
            }
        ],
    }


def make_settings(redis_url: str, tmp_path: Path, **overrides) -> Settings:
    rules_file = tmp_path / "triggers.json"
    rules_file.write_text(json.dumps(RULES))
    values: dict = {
        "redis_url": redis_url,
        "webhook_token": TOKEN,
        "triggers": rules_file,
        "api_max_body_bytes": 64 * 1024,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return make_settings(redis_url, tmp_path)


@contextmanager
def serve(settings: Settings) -> Iterator[httpx.Client]:
    """The API on a real uvicorn server (loopback, free port) in a thread, and a client."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=10) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def client(settings: Settings) -> Iterator[httpx.Client]:
    with serve(settings) as http:
        yield http


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def job_ids(client: httpx.Client, **params) -> list[str]:
    response = client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    return [record["id"] for record in response.json()]


# --- jobs -------------------------------------------------------------------------------------


def test_submit_returns_201_then_200_for_the_same_invocation_id(client: httpx.Client) -> None:
    first = client.post("/jobs", json={**SEED, "invocation_id": "inv_1"})
    assert first.status_code == 201, first.text
    assert first.headers[DUPLICATE_HEADER] == "false"
    record = first.json()
    assert record["id"] == "inv_1"
    assert record["state"] == "queued"
    for key in ("invocation_id", "request", "created_at", "progress", "outputs", "error"):
        assert key in record
    again = client.post("/jobs", json={**SEED, "invocation_id": "inv_1"})
    assert again.status_code == 200
    assert again.headers[DUPLICATE_HEADER] == "true"
    assert again.json()["id"] == "inv_1"
    assert job_ids(client) == ["inv_1"]
    assert client.get("/jobs/inv_1").json()["request"]["object"] == "480P.mp4"
    logs = client.get("/jobs/inv_1/logs").json()
    assert logs["id"] == "inv_1" and isinstance(logs["lines"], list)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({**SEED, "dst_format": "mp3"}, "unsupported format"),
        ({**SEED, "colour": "red"}, "colour: unknown field"),
        ({**SEED, "output_dir": "../up"}, "output_dir"),
        ({**SEED, "invocation_id": "1bad id"}, "invocation_id"),
        ({"bucket": "my-bucket", "object": "a.mp4"}, "give dst_format or dst_formats"),
        ({**SEED, "bucket": "Bad_Bucket"}, "invalid bucket name"),
    ],
)
def test_invalid_requests_answer_422_with_a_readable_message(
    client: httpx.Client, body: dict, words: str
) -> None:
    response = client.post("/jobs", json=body)
    assert response.status_code == 422
    assert words in response.json()["detail"]
    assert "Value error" not in response.json()["detail"]
    assert job_ids(client) == []


def test_malformed_json_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_unknown_job_is_404(client: httpx.Client) -> None:
    for path in ("/jobs/nope", "/jobs/nope/logs", "/jobs/bad%20id"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "JobNotFound"
    assert client.post("/jobs/nope/stop").status_code == 404
    assert client.post("/jobs/nope/retry").status_code == 404


def test_stop_and_retry_follow_the_job_state(client: httpx.Client) -> None:
    client.post("/jobs", json={**SEED, "invocation_id": "job_a"})
    assert client.post("/jobs/job_a/retry").status_code == 409  # queued: nothing to retry
    stopped = client.post("/jobs/job_a/stop")
    assert stopped.status_code == 200
    assert stopped.json()["state"] in ("stopped", "stopping")
    wait_for(lambda: client.get("/jobs/job_a").json()["state"] == "stopped", 5, "stopped")
    again = client.post("/jobs/job_a/stop")
    assert again.status_code == 409
    assert again.json()["error"] == "InvalidState"
    retried = client.post("/jobs/job_a/retry")
    assert retried.status_code == 200
    assert retried.json()["state"] == "queued"


def test_list_filters_by_state_time_and_page(client: httpx.Client) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    for index in range(5):
        assert (
            client.post("/jobs", json={**SEED, "invocation_id": f"list_{index}"}).status_code == 201
        )
    client.post("/jobs/list_1/stop")
    client.post("/jobs/list_3/stop")
    after = datetime.now(UTC) + timedelta(seconds=1)

    assert job_ids(client) == [f"list_{index}" for index in (4, 3, 2, 1, 0)]  # newest first
    assert set(job_ids(client, state="stopped")) == {"list_1", "list_3"}
    assert set(job_ids(client, state="queued")) == {"list_0", "list_2", "list_4"}
    assert job_ids(client, state="failed") == []
    assert job_ids(client, limit=2) == ["list_4", "list_3"]
    assert job_ids(client, limit=2, offset=2) == ["list_2", "list_1"]
    assert len(job_ids(client, since=before.isoformat(), until=after.isoformat())) == 5
    assert job_ids(client, since=after.isoformat()) == []
    assert job_ids(client, until=before.isoformat()) == []

    for bad in ({"state": "bogus"}, {"limit": 0}, {"offset": -1}, {"since": "yesterday"}):
        response = client.get("/jobs", params=bad)
        assert response.status_code == 422, bad
        assert response.json()["detail"]
    inverted = client.get("/jobs", params={"since": after.isoformat(), "until": before.isoformat()})
    assert inverted.status_code == 422


def test_request_bodies_are_size_limited(client: httpx.Client, settings: Settings) -> None:
    big = {**SEED, "object": "x" * (settings.api_max_body_bytes + 10)}
    response = client.post("/jobs", json=big)
    assert response.status_code == 413
    # a chunked body (no Content-Length) is counted as it arrives
    chunks = (b"x" * 4096 for _ in range(settings.api_max_body_bytes // 4096 + 2))
    response = client.post(
        "/hooks/s3", content=chunks, headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert job_ids(client) == []


def test_healthz_metrics_and_openapi(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json()["redis"] == "ok"
    assert health.json()["triggers"] == "1 rules"

    client.post("/jobs", json={**SEED, "invocation_id": "metric_1"})
    text = client.get("/metrics").text
    for name in (
        'transcoder_jobs{state="queued"} 1.0',
        "transcoder_queue_depth",
        "transcoder_job_duration_seconds_bucket",
        "transcoder_job_progress_percent",
        "transcoder_bytes_in_total",
        "transcoder_bytes_out_total",
        "transcoder_scrape_error 0.0",
    ):
        assert name in text

    spec = client.get("/openapi.json").json()
    for path in (
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/logs",
        "/jobs/{job_id}/stop",
        "/jobs/{job_id}/retry",
        "/hooks/s3",
        "/healthz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert DUPLICATE_HEADER in spec["paths"]["/jobs"]["post"]["description"]


def test_healthz_reports_redis_down(tmp_path: Path) -> None:
    settings = make_settings("redis://127.0.0.1:1/0", tmp_path)
    with serve(settings) as client:
        response = client.get("/healthz")
        assert response.status_code == 503
        assert "127.0.0.1:1" not in response.text
        assert client.get("/jobs").status_code == 503


# --- the webhook ------------------------------------------------------------------------------


def test_hook_refuses_missing_or_wrong_token(client: httpx.Client) -> None:
    event = s3_event("uploads/a.mp4")
    missing = client.post("/hooks/s3", json=event)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/hooks/s3", json=event, headers=auth("wrong")).status_code == 403
    assert client.post("/hooks/s3", json=event, headers={"Authorization": TOKEN}).status_code == 401
    # refused before the body is even read
    assert client.post("/hooks/s3", content=b"{garbage").status_code == 401
    assert job_ids(client) == []


def test_hook_without_configured_token_refuses_everything(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, webhook_token=None)
    with serve(settings) as client:
        for headers in ({}, auth(), auth("x")):
            response = client.post("/hooks/s3", json=s3_event("uploads/a.mp4"), headers=headers)
            assert response.status_code in (401, 403)
        assert job_ids(client) == []


def test_hook_makes_one_job_per_event_and_none_on_redelivery(client: httpx.Client) -> None:
    event = s3_event("uploads/2026/clip.mp4")
    response = client.post("/hooks/s3", json=event, headers=auth())
    assert response.status_code == 200, response.text
    (job,) = response.json()["jobs"]
    assert job["created"] is True
    assert job["id"].startswith("s3_")
    record = client.get(f"/jobs/{job['id']}").json()
    assert record["request"]["object"] == "uploads/2026/clip.mp4"
    assert record["request"]["output_dir"] == "transcoded/uploads/2026/clip"
    assert record["request"]["dst_formats"] == ["mov"]

    redelivered = client.post("/hooks/s3", json=event, headers=auth()).json()
    assert redelivered["jobs"] == [{**job, "created": False}]
    assert job_ids(client) == [job["id"]]
    # the same key uploaded again with new content is a new job
    changed = client.post(
        "/hooks/s3", json=s3_event("uploads/2026/clip.mp4", etag="ff" * 16), headers=auth()
    )
    assert changed.json()["jobs"][0]["created"] is True
    assert len(job_ids(client)) == 2


@pytest.mark.parametrize(
    "key",
    ["uploads/my clip.mp4", "uploads/a+b.mp4", "uploads/été/日本 語.mp4", "uploads/100% real.mp4"],
)
def test_hook_decodes_keys(client: httpx.Client, key: str) -> None:
    response = client.post("/hooks/s3", json=s3_event(key), headers=auth())
    (job,) = response.json()["jobs"]
    assert job["key"] == key
    assert client.get(f"/jobs/{job['id']}").json()["request"]["object"] == key


def test_hook_ignores_other_events_and_service_outputs(client: httpx.Client) -> None:
    cases = [
        s3_event("uploads/a.mp4", event_name="s3:ObjectRemoved:Delete"),
        s3_event("uploads/a.mp4", event_name="s3:ObjectAccessed:Get"),
        s3_event("elsewhere/a.mp4"),
        # an output of the service, marked by the metadata workers put on uploads
        s3_event("uploads/out.mp4", metadata={"X-Amz-Meta-Transcoder-Job": "s3_abc"}),
        # a key where a rule writes outputs, even without the metadata
        s3_event("transcoded/uploads/x/x.mp4"),
    ]
    for event in cases:
        response = client.post("/hooks/s3", json=event, headers=auth())
        assert response.status_code == 200
        assert response.json()["jobs"] == []
        assert response.json()["ignored"][0]["reason"]
    assert job_ids(client) == []


def test_hook_takes_several_records_and_refuses_garbage(client: httpx.Client) -> None:
    body = s3_event("uploads/one.mp4")
    body["Records"] += s3_event("uploads/two.mp4")["Records"] + s3_event("other/x.mp4")["Records"]
    result = client.post("/hooks/s3", json=body, headers=auth()).json()
    assert len(result["jobs"]) == 2 and len(result["ignored"]) == 1

    garbage = client.post("/hooks/s3", content=b"{nope", headers=auth())
    assert garbage.status_code == 422
    assert (
        client.post("/hooks/s3", json={"Records": [{"s3": {}}]}, headers=auth()).status_code == 422
    )
    # MinIO's connectivity probe
    assert client.head("/hooks/s3").status_code == 200


def test_hook_without_rules_makes_no_job(redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, tmp_path, triggers=None)
    with serve(settings) as client:
        result = client.post("/hooks/s3", json=s3_event("uploads/a.mp4"), headers=auth()).json()
        assert result["jobs"] == []
        assert result["ignored"][0]["reason"] == "no trigger rules configured"
        assert client.get("/healthz").json()["triggers"] == "none"


def test_hook_reports_a_broken_rules_file(client: httpx.Client, settings: Settings) -> None:
    assert settings.triggers is not None
    settings.triggers.write_text('[{"bucket": "media", "oops": 1}]')
    response = client.post("/hooks/s3", json=s3_event("uploads/a.mp4"), headers=auth())
    assert response.status_code == 500
    assert "oops" in response.json()["detail"]
    assert "error" in client.get("/healthz").json()["triggers"]


# --- a real server process --------------------------------------------------------------------


def cli_api_args() -> list[str]:
    """`transcoder api` (Typer runs a lone command without its name, e.g. in a partial tree)."""
    from transcoder.cli import app

    prefix = [sys.executable, "-c", "from transcoder.cli import main; main()"]
    return prefix if len(app.registered_commands) == 1 else [*prefix, "api"]


def test_cli_serves_on_loopback_by_default(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TRANSCODER_REDIS_URL": redis_url,
        "TRANSCODER_API_PORT": str(port),
        "TRANSCODER_WEBHOOK_TOKEN": TOKEN,
    }
    env.pop("TRANSCODER_API_HOST", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from transcoder.cli import main; main()",
            "api",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def healthy() -> bool:
            assert process.poll() is None, "transcoder api exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 20, "transcoder api to answer")
        listening = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True
        )
        if listening.returncode == 0 and listening.stdout.strip():
            local_addresses = {line.split()[3] for line in listening.stdout.splitlines()}
            assert local_addresses == {f"127.0.0.1:{port}"}
    finally:
        process.terminate()
        process.wait(10)


def test_cli_refuses_a_broken_rules_file(tmp_path: Path) -> None:
    bad = tmp_path / "triggers.yml"
    bad.write_text("- bucket: media\n  dst_formats: [mp3]\n  output_dir: x\n")
    result = subprocess.run(
        cli_api_args(),
        env={
            **os.environ,
            "TRANSCODER_TRIGGERS": str(bad),
            "TRANSCODER_REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "unsupported format 'mp3'" in result.stderr
    assert "Traceback" not in result.stderr


# --- end to end: a real worker and S3 server ------------------------------------------------


@pytest.fixture
def live(redis_url: str, s3_server, tmp_path: Path, ffmpeg_available: None):  # type: ignore[no-untyped-def]
    """The API (in-process uvicorn) and one `celery -A tasks worker`, on moto and test Redis."""
    from workers import FAST_ENV, Worker

    env = {
        **s3_server.env(),
        **FAST_ENV,
        "TRANSCODER_REDIS_URL": redis_url,
        "TRANSCODER_WORK_DIR": str(tmp_path / "work"),
    }
    names = {key.removeprefix("TRANSCODER_").lower(): value for key, value in env.items()}
    names.pop("redis_url")
    settings = make_settings(redis_url, tmp_path, **names)
    worker = Worker("api", env, tmp_path, concurrency=2).start()
    try:
        worker.wait_ready()
        with serve(settings) as http:
            yield http, s3_server.client(), worker
    finally:
        worker.stop()


def test_upload_event_makes_one_job_whose_outputs_land_where_the_rule_says(
    live, make_media
) -> None:  # type: ignore[no-untyped-def]
    http, s3, worker = live
    s3.make_bucket("media")
    source = make_media("clip.mp4", duration_s=1.0)
    key = "uploads/new dir/my+clip é.mp4"
    s3.fput_object("media", key, str(source), content_type="video/mp4")
    etag = s3.stat_object("media", key).etag

    response = http.post("/hooks/s3", json=s3_event(key, etag=etag), headers=auth())
    (job,) = response.json()["jobs"]
    assert job["created"]

    def finished() -> dict | None:
        record = http.get(f"/jobs/{job['id']}").json()
        return record if record["state"] in ("succeeded", "failed", "stopped") else None

    record = wait_for(finished, 60, "the triggered job to finish", interval_s=0.2)
    assert record["state"] == "succeeded", (record["error"], worker.log()[-2000:])
    expected = "transcoded/uploads/new dir/my+clip é/my+clip é.mov"
    assert [output["key"] for output in record["outputs"]] == [expected]
    stat = s3.stat_object("media", expected)
    assert stat.size > 0

    # the redelivered event, and events for the output itself, make no job
    assert http.post("/hooks/s3", json=s3_event(key, etag=etag), headers=auth()).json()["jobs"] == [
        {**job, "created": False}
    ]
    output_metadata = {
        k: v for k, v in stat.metadata.items() if k.lower().startswith("x-amz-meta-")
    }
    for event in (s3_event(expected, etag=stat.etag, metadata=output_metadata), s3_event(expected)):
        assert http.post("/hooks/s3", json=event, headers=auth()).json()["jobs"] == []
    assert [r["id"] for r in http.get("/jobs").json()] == [job["id"]]

    # an output written into a rule's INPUT prefix (a job submitted by hand) is recognised by
    # the metadata workers put on their uploads: in the event (MinIO) or by a stat (AWS form)
    manual = http.post(
        "/jobs",
        json={
            "bucket": "media",
            "object": key,
            "output_dir": "uploads/by-hand",
            "dst_format": "mp4",
        },
    ).json()
    record = wait_for(
        lambda: (r := http.get(f"/jobs/{manual['id']}").json())["state"] == "succeeded" and r,
        60,
        "manual job",
    )
    output_key = record["outputs"][0]["key"]
    assert output_key == "uploads/by-hand/my+clip é.mp4"
    aws_form = s3_event(output_key)
    del aws_form["Records"][0]["s3"]["object"]["userMetadata"]
    aws_form["Records"][0]["eventName"] = "ObjectCreated:Put"
    hand_made = s3_event(output_key, metadata={"content-type": "video/mp4"})  # marker missing
    for event in (aws_form, hand_made):
        result = http.post("/hooks/s3", json=event, headers=auth()).json()
        assert result["jobs"] == []
        assert result["ignored"][0]["reason"] == "object was written by the service"
    assert len(http.get("/jobs").json()) == 2
