"""The worker service end to end: real Redis, a real moto S3 server, real ffmpeg and real
`celery -A tasks worker` processes (two, shared by the module, with lowered timeouts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SAMPLE,
    clean_redis_database,
    free_port,
    generate_media,
    running_moto,
    start_moto,
    wait_for,
)
from workers import FAST_ENV, Worker, ffmpeg_processes, worker_pool

from transcoder import keys, service
from transcoder.errors import (
    CancelledError,
    ObjectNotFoundError,
    SourceTooLargeError,
    StorageError,
)
from transcoder.models import JobRecord, JobState
from transcoder.settings import Settings
from transcoder.storage import Storage

pytestmark = pytest.mark.integration

SUCCESS_LIST = "test:success"


@pytest.fixture(scope="module")
def redis_db() -> Iterator[str]:
    """The tests' Redis database for the whole module (workers keep their broker state)."""
    with clean_redis_database() as url:
        yield url


@pytest.fixture(scope="module")
def moto(ffmpeg_available: None) -> Iterator[object]:
    """Our own moto_server (the outage test stops and restarts it on its port)."""
    with running_moto() as server:
        yield server


@pytest.fixture(scope="module")
def env(redis_db: str, moto, tmp_path_factory) -> dict[str, str]:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("work")
    return {
        **moto.env(),
        **FAST_ENV,
        "TRANSCODER_REDIS_URL": redis_db,
        "TRANSCODER_WORK_DIR": str(work),
        "TRANSCODER_ON_SUCCESS": f"redis-list:{SUCCESS_LIST}",
    }


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> Settings:
    names = {key.removeprefix("TRANSCODER_").lower(): value for key, value in env.items()}
    return Settings(**names)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def workers(env: dict[str, str], tmp_path_factory) -> Iterator[list[Worker]]:  # type: ignore[no-untyped-def]
    logs = tmp_path_factory.mktemp("logs")
    with worker_pool(("alpha", "beta"), env, logs, concurrency=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return tmp_path_factory.mktemp("media")


@pytest.fixture
def s3(moto):  # type: ignore[no-untyped-def]
    return moto.client()


class TaskEvents:
    """Collects the workers' task events, as Flower receives them."""

    ENDINGS = {"task-succeeded": "SUCCESS", "task-failed": "FAILURE", "task-retried": "RETRY"}

    def __init__(self, settings: Settings) -> None:
        self.app = service.celery_app(settings)
        self.events: list[dict] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.receiver: Any = None
        self.ready = threading.Event()

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.events.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> TaskEvents:
        self.thread.start()
        self.ready.wait(10)
        time.sleep(0.3)  # the receiver's queue is bound once it consumes
        return self

    def stop(self) -> list[dict]:
        self.receiver.should_stop = True  # checked between drains (about once a second)
        self.thread.join(5)
        return self.events

    def progress(self, job_id: str) -> list[dict]:
        return [e for e in self.events if e["type"] == "task-progress" and e["job_id"] == job_id]

    def endings(self, job_id: str) -> list[tuple[str, str]]:
        """(state, exception) of each ended task of the job, in order: what Flower shows."""
        uuids = {
            e["uuid"]
            for e in self.events
            if e["type"] == "task-received"
            and e.get("name") == "transcoder.transcode"
            and (f"job {job_id}:" in str(e.get("kwargs")) or job_id in str(e.get("args")))
        }
        return [
            (self.ENDINGS[e["type"]], str(e.get("exception", "")))
            for e in list(self.events)
            if e["type"] in self.ENDINGS and e["uuid"] in uuids
        ]

    def ended(self, job_id: str, timeout_s: float = 20) -> list[tuple[str, str]]:
        return wait_for(lambda: self.endings(job_id), timeout_s, f"task events of {job_id}")


def upload(s3, bucket: str, key: str, path: Path) -> None:  # type: ignore[no-untyped-def]
    if not s3.bucket_exists(bucket):
        s3.make_bucket(bucket)
    s3.fput_object(bucket, key, str(path))


def finished(settings: Settings, job_id: str, timeout_s: float = 60) -> JobRecord:
    def done() -> JobRecord | None:
        record = service.get_job(job_id, settings=settings)
        return record if record.state.finished else None

    return wait_for(done, timeout_s, f"job {job_id} to finish", interval_s=0.1)


def envelopes(settings: Settings, key: str, job_id: str) -> list[dict]:
    client = service.get_store(settings).client
    found = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    return [body for body in found if body["requestContext"]["requestId"] == job_id]


def decodes(s3, bucket: str, key: str, tmp_path: Path) -> bool:  # type: ignore[no-untyped-def]
    local = tmp_path / key.replace("/", "_")
    s3.fget_object(bucket, key, str(local))
    result = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(local), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0 and not result.stderr.strip()


def test_storage_wrapper_maps_errors_and_streams(settings, s3, media, tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = Storage(settings)
    upload(s3, "store-bucket", "dir/a b+%.mp4", SAMPLE)
    target = tmp_path / "copy.mp4"
    info = storage.download("store-bucket", "dir/a b+%.mp4", target)
    assert info.size == target.stat().st_size == SAMPLE.stat().st_size
    storage.upload("store-bucket", "out/x.m3u8", target, job_id="j1")
    stat = s3.stat_object("store-bucket", "out/x.m3u8")
    assert stat.content_type == "application/vnd.apple.mpegurl"
    assert stat.metadata.get("x-amz-meta-transcoder-job") == "j1"
    with pytest.raises(ObjectNotFoundError):
        storage.download("store-bucket", "missing.mp4", target)
    with pytest.raises(ObjectNotFoundError):
        storage.stat("no-such-bucket", "x.mp4")
    # server-side copy into place: the final key's content type, the service's metadata
    storage.upload("store-bucket", "tmp/x.m3u8.part", target, job_id="j1", attempt="a1",
                   content_key="x.m3u8")  # fmt: skip
    storage.copy("store-bucket", "tmp/x.m3u8.part", "out/y.m3u8", job_id="j1", attempt="a1")
    copied = s3.stat_object("store-bucket", "out/y.m3u8")
    assert copied.size == target.stat().st_size
    assert copied.content_type == "application/vnd.apple.mpegurl"
    assert storage.written_by("store-bucket", "out/y.m3u8") == ("j1", "a1")
    assert storage.written_by("store-bucket", "out/none.m3u8") is None
    storage.remove_many("store-bucket", ["tmp/x.m3u8.part", "out/y.m3u8", "out/none.m3u8"])
    assert [o.object_name for o in s3.list_objects("store-bucket", recursive=True)
            if str(o.object_name).startswith(("tmp/", "out/y"))] == []  # fmt: skip
    assert storage.remove_prefix("store-bucket", "out/") == 1
    too_small = Settings(**{**settings.model_dump(), "max_source_bytes": 10})
    with pytest.raises(SourceTooLargeError):
        Storage(too_small).download("store-bucket", "dir/a b+%.mp4", target)
    # a stop during a multipart upload takes effect between parts, and leaves no object
    big = tmp_path / "big.ts"
    big.write_bytes(os.urandom(20 * 1024 * 1024))  # three 8 MiB parts
    seen: list[int] = []
    storage.upload("store-bucket", "out/whole.ts", big, on_bytes=lambda done, _: seen.append(done))
    assert seen[-1] == big.stat().st_size
    assert s3.stat_object("store-bucket", "out/whole.ts").size == big.stat().st_size
    cancel = threading.Event()
    sent: list[int] = []

    def stop_after_first_part(done: int, _total: int) -> None:
        sent.append(done)
        cancel.set()

    with pytest.raises(CancelledError):
        storage.upload(
            "store-bucket", "out/cut.ts", big, cancel=cancel, on_bytes=stop_after_first_part
        )
    assert sent and sent[-1] < big.stat().st_size
    assert [o.object_name for o in s3.list_objects("store-bucket", prefix="out/cut")] == []
    storage.remove("store-bucket", ["out/whole.ts"])
    unreachable = Settings(**{**settings.model_dump(), "s3_endpoint": f"127.0.0.1:{free_port()}"})
    with pytest.raises(StorageError) as caught:
        Storage(unreachable, retries=0).stat("store-bucket", "x.mp4")
    assert caught.value.retryable and "testsecret" not in str(caught.value)


def test_seed_invocations_each_succeed_once(workers, settings, s3, media, tmp_path) -> None:  # type: ignore[no-untyped-def]
    upload(s3, "my-bucket", "480P.mp4", SAMPLE)
    task_events = TaskEvents(settings).start()
    formats = ["mov", "mov", "flv", "avi", "m3u8"]
    ids = [f"my{n}-480P-mp4" for n in range(1, 6)]
    for job_id, fmt in zip(ids, formats, strict=True):
        request = {
            "bucket": "my-bucket",
            "object": "480P.mp4",
            "output_dir": "a",
            "dst_format": fmt,
            "invocation_id": job_id,
        }
        assert service.submit(request, settings=settings).created
    for job_id, fmt in zip(ids, formats, strict=True):
        record = finished(settings, job_id)
        assert record.state == JobState.SUCCEEDED, record.error
        assert record.attempts == 1
        assert record.outputs[-1].key == f"a/480P.{fmt}"
        assert record.commands and record.commands[0][0].endswith("ffmpeg")
        assert [
            e["requestContext"]["condition"] for e in envelopes(settings, SUCCESS_LIST, job_id)
        ] == ["Success"]
        assert {state for state, _ in task_events.ended(job_id)} == {"SUCCESS"}
    task_events.stop()
    keys_found = {
        obj.object_name for obj in s3.list_objects("my-bucket", prefix="a/", recursive=True)
    }
    assert {"a/480P.mov", "a/480P.flv", "a/480P.avi", "a/480P.m3u8"} <= keys_found
    segments = [key for key in keys_found if key.endswith(".ts")]
    assert segments
    for key in ("a/480P.mov", "a/480P.flv", "a/480P.avi", "a/480P.m3u8"):
        if key.endswith(".m3u8"):
            for segment in segments:
                s3.fget_object("my-bucket", segment, str(tmp_path / segment.split("/")[-1]))
            s3.fget_object("my-bucket", key, str(tmp_path / "480P.m3u8"))
            check = subprocess.run(
                ["ffmpeg", "-v", "error", "-i", str(tmp_path / "480P.m3u8"), "-f", "null", "-"],
                capture_output=True,
            )
            assert check.returncode == 0
        else:
            assert decodes(s3, "my-bucket", key, tmp_path), key

    # the same invocation id again runs nothing and says so
    again = service.submit(
        {
            "bucket": "my-bucket",
            "object": "480P.mp4",
            "output_dir": "a",
            "dst_format": "mov",
            "invocation_id": "my1-480P-mp4",
        },
        settings=settings,
    )
    assert not again.created and again.record.state == JobState.SUCCEEDED
    time.sleep(1.5)
    assert service.get_job("my1-480P-mp4", settings=settings).attempts == 1
    assert len(envelopes(settings, SUCCESS_LIST, "my1-480P-mp4")) == 1


def test_plain_celery_delay_and_invalid_request(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    upload(s3, "plain-bucket", "in/clip one.mp4", SAMPLE)
    app = service.celery_app(settings)
    good_task = app.send_task(
        "transcoder.transcode",
        args=[
            {
                "bucket": "plain-bucket",
                "object": "in/clip one.mp4",
                "output_dir": "out",
                "dst_format": "MP4",
                "invocation_id": "plain_1",
            }
        ],
    )
    bad_request = {
        "bucket": "plain-bucket",
        "object": "x.mp4",
        "dst_format": "mkv",
        "invocation_id": "bad_1",
    }
    bad_task = app.send_task("transcoder.transcode", args=[bad_request])
    record = finished(
        settings,
        wait_for(
            lambda: service.get_store(settings).find("plain_1"), 30, "the task to create the record"
        ).id,
    )
    assert record.state == JobState.SUCCEEDED and record.outputs[0].key == "out/clip one.mp4"
    bad = wait_for(lambda: service.get_store(settings).find("bad_1"), 30, "the invalid record")
    assert bad.state == JobState.INVALID and "mkv" in bad.error.message
    dead = wait_for(
        lambda: envelopes(settings, keys.DLQ, "bad_1"), 30, "the InvalidRequest envelope"
    )
    assert dead[0]["requestContext"]["condition"] == "InvalidRequest"
    assert dead[0]["responseContext"]["functionError"] == "Handled"
    # the Celery result (what Flower and `AsyncResult` show) tells the two apart
    assert wait_for(lambda: good_task.state == "SUCCESS", 30, "the good task's result")
    assert wait_for(lambda: bad_task.state == "FAILURE", 30, "the bad task's result")
    assert "invalid" in str(bad_task.result) and "mkv" in str(bad_task.result)
    # a duplicate of the invalid message is dropped quietly: no second record or envelope
    again = app.send_task("transcoder.transcode", args=[bad_request])
    assert wait_for(lambda: again.state == "SUCCESS", 30, "the duplicate's result")
    assert len(envelopes(settings, keys.DLQ, "bad_1")) == 1
    log = "".join(worker.log() for worker in workers)
    assert f"Task transcoder.transcode[{bad_task.id}] raised expected: JobFailed" in log
    assert f"Task transcoder.transcode[{bad_task.id}] raised unexpected" not in log


def test_truncated_source_fails_once_into_the_dlq(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    # moov at the end (no faststart): the cut file has no index at all
    whole = generate_media(media / "whole.mp4", duration_s=3, size="320x240").read_bytes()
    truncated = media / "truncated.mp4"
    truncated.write_bytes(whole[: len(whole) // 3])
    upload(s3, "bad-bucket", "truncated.mp4", truncated)
    task_events = TaskEvents(settings).start()
    job_id = service.submit(
        {"bucket": "bad-bucket", "object": "truncated.mp4", "dst_format": "mov", "output_dir": "o"},
        settings=settings,
    ).record.id
    record = finished(settings, job_id)
    assert record.state == JobState.FAILED and record.attempts == 1
    assert record.error is not None and record.error.stderr_tail
    # Flower shows the task FAILURE (not SUCCESS); the message was not retried
    for state, exception in task_events.ended(job_id):
        assert state == "FAILURE" and "JobFailed" in exception and job_id in exception
    dead = wait_for(lambda: envelopes(settings, keys.DLQ, job_id), 20, "the DLQ envelope")
    time.sleep(1)
    dead = envelopes(settings, keys.DLQ, job_id)
    assert len(dead) == 1
    body = dead[0]
    assert body["requestContext"] == {
        "requestId": job_id,
        "functionArn": "transcoder.transcode",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 1,
    }
    assert body["responsePayload"]["stderrTail"] and body["responsePayload"]["errorType"]
    assert not list(s3.list_objects("bad-bucket", prefix="o/", recursive=True))

    # index first (faststart), data cut: ffmpeg starts, then the data ends early. The failed
    # job's record and log keep the ffmpeg command line: what an operator reruns by hand
    fast = generate_media(
        media / "fast.mp4", duration_s=3, extra_output_args=("-movflags", "+faststart")
    ).read_bytes()
    (media / "cut.mp4").write_bytes(fast[: len(fast) // 2])
    upload(s3, "bad-bucket", "cut.mp4", media / "cut.mp4")
    cut_id = service.submit(
        {"bucket": "bad-bucket", "object": "cut.mp4", "dst_format": "mov", "output_dir": "c"},
        settings=settings,
    ).record.id
    cut = finished(settings, cut_id)
    assert cut.state == JobState.FAILED and cut.attempts == 1, cut.error
    (command,) = cut.commands
    assert Path(command[0]).name == "ffmpeg" and any(arg.endswith("cut.mov") for arg in command)
    logged = service.job_logs(cut_id, settings=settings)
    assert sum("ffmpeg command: " in line for line in logged) == 1
    assert [state for state, _ in task_events.ended(cut_id)] == ["FAILURE"]
    task_events.stop()
    assert not list(s3.list_objects("bad-bucket", prefix="c/", recursive=True))


def test_stop_running_job_kills_ffmpeg_within_two_seconds(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    clip = generate_media(media / "long.mp4", duration_s=60, size="640x480")
    upload(s3, "stop-bucket", "long.mp4", clip)
    task_events = TaskEvents(settings).start()
    job_id = service.submit(
        {
            "bucket": "stop-bucket",
            "object": "long.mp4",
            "dst_format": "webm",
            "output_dir": "s",
            "copy_policy": "never",
        },
        settings=settings,
    ).record.id
    work = settings.work_dir

    def transcoding() -> bool:
        record = service.get_job(job_id, settings=settings)
        return record.progress.phase == "transcode" and record.progress.percent > 6

    wait_for(transcoding, 30, "the transcode to make progress", interval_s=0.1)
    pids = ffmpeg_processes(work)
    assert pids, "ffmpeg should be running"
    stopped_at = time.monotonic()
    assert service.stop_job(job_id, settings=settings).state == JobState.STOPPING
    wait_for(lambda: not ffmpeg_processes(work), 2.0, "ffmpeg to be gone", interval_s=0.05)
    assert time.monotonic() - stopped_at <= 2.0
    record = finished(settings, job_id, 10)
    assert record.state == JobState.STOPPED
    assert record.commands and Path(record.commands[0][0]).name == "ffmpeg"
    assert not list(s3.list_objects("stop-bucket", prefix="s/", recursive=True))
    assert not [p for p in work.iterdir() if p.name.startswith(job_id)]
    dead = wait_for(lambda: envelopes(settings, keys.DLQ, job_id), 20, "the Stopped envelope")
    assert dead[0]["requestContext"]["condition"] == "Stopped"
    # Flower's view: task-progress events carrying the job's progress, then FAILURE (a task
    # must not stay PROGRESS once its job stopped)
    for state, exception in task_events.ended(job_id):
        assert state == "FAILURE" and "JobStopped" in exception
    task_events.stop()
    seen = task_events.progress(job_id)
    assert seen and {"percent", "phase", "fps", "speed", "eta_s"} <= set(seen[-1])
    assert any(event["phase"] == "transcode" for event in seen)


def test_retry_after_missing_object(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    s3.make_bucket("retry-bucket")
    job_id = service.submit(
        {
            "bucket": "retry-bucket",
            "object": "later.mp4",
            "dst_format": "flv",
            "invocation_id": "retry_me",
        },
        settings=settings,
    ).record.id
    record = finished(settings, job_id)
    assert record.state == JobState.FAILED and record.error is not None
    assert record.error.type == "ObjectNotFound"
    assert record.attempts == 1  # permanent: not retried
    upload(s3, "retry-bucket", "later.mp4", SAMPLE)
    assert service.retry_job(job_id, settings=settings).state == JobState.QUEUED
    record = finished(settings, job_id)
    assert record.state == JobState.SUCCEEDED and record.attempts == 2
    assert [o.key for o in record.outputs] == ["later.flv"]


def test_job_longer_than_visibility_timeout_runs_once(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    clip = generate_media(media / "vt.mp4", duration_s=22, size="640x480")
    upload(s3, "vt-bucket", "vt.mp4", clip)
    task_events = TaskEvents(settings).start()
    job_id = service.submit(
        {"bucket": "vt-bucket", "object": "vt.mp4", "dst_format": "webm", "copy_policy": "never"},
        settings=settings,
    ).record.id
    record = finished(settings, job_id, 120)
    assert record.state == JobState.SUCCEEDED and record.finished_at and record.started_at
    run_s = (record.finished_at - record.started_at).total_seconds()
    assert run_s >= 3 * int(FAST_ENV["TRANSCODER_VISIBILITY_TIMEOUT_S"]), run_s
    assert record.attempts == 1
    assert len(envelopes(settings, SUCCESS_LIST, job_id)) == 1
    # the broker did redeliver the message meanwhile; the lease made it a no-op, and Flower
    # never saw the task end otherwise than SUCCESS
    assert any(f"job {job_id}: message dropped" in worker.log() for worker in workers)
    assert {state for state, _ in task_events.ended(job_id)} == {"SUCCESS"}
    task_events.stop()


def test_killed_worker_job_finishes_on_another(workers, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    upload(s3, "kill-bucket", "480P.mp4", SAMPLE)
    job_id = service.submit(
        {
            "bucket": "kill-bucket",
            "object": "480P.mp4",
            "dst_format": "webm",
            "copy_policy": "never",
        },
        settings=settings,
    ).record.id

    def transcoding() -> JobRecord | None:
        record = service.get_job(job_id, settings=settings)
        return (
            record if record.progress.phase == "transcode" and record.progress.percent > 8 else None
        )

    running = wait_for(transcoding, 30, "the transcode to start", interval_s=0.1)
    victim = next(w for w in workers if w.hostname == running.worker)
    victim.kill()
    killed_at = time.monotonic()
    record = finished(settings, job_id, 60)
    assert time.monotonic() - killed_at < 60
    assert record.state == JobState.SUCCEEDED and record.worker != victim.hostname
    assert record.attempts == 2, record.events
    # the reaper re-enqueued it, or the broker's redelivery took the expired lease over
    events = [event.event for event in record.events]
    assert events.count("requeued") + events.count("takeover") >= 1
    time.sleep(2)
    assert len(envelopes(settings, SUCCESS_LIST, job_id)) == 1
    victim.start().wait_ready()  # later tests get both workers back


def test_storage_outage_is_retried(workers, settings, moto, media) -> None:  # type: ignore[no-untyped-def]
    moto.process.terminate()
    moto.process.wait(10)
    task_events = TaskEvents(settings).start()
    job_id = service.submit(
        {
            "bucket": "outage-bucket",
            "object": "480P.mp4",
            "dst_format": "mov",
            "invocation_id": "outage_1",
        },
        settings=settings,
    ).record.id
    wait_for(
        lambda: service.get_job(job_id, settings=settings).state == JobState.RETRYING,
        30,
        "the first attempt to fail on the outage",
    )
    restarted = start_moto(moto.port)  # same port; moto keeps nothing: put the source back
    moto.process = restarted.process
    upload(restarted.client(), "outage-bucket", "480P.mp4", SAMPLE)
    record = finished(settings, job_id, 60)
    assert record.state == JobState.SUCCEEDED, record.error
    assert record.attempts >= 2
    assert any(
        event.event == "retrying" and "StorageError" in event.detail for event in record.events
    )
    # Flower: the failed attempt's task RETRY, the last one SUCCESS
    wait_for(lambda: task_events.endings(job_id)[-1:] == [("SUCCESS", "")], 20, "the success")
    task_events.stop()
    endings = task_events.endings(job_id)
    assert "FAILURE" not in [state for state, _ in endings]
    assert any(state == "RETRY" and "StorageError" in exc for state, exc in endings)


def test_cli_submit_wait_and_status(workers, env, settings, s3, media) -> None:  # type: ignore[no-untyped-def]
    upload(s3, "cli-bucket", "480P.mp4", SAMPLE)
    cli = [sys.executable, "-c", "from transcoder.cli import main; main()"]
    cli_env = {**os.environ, **env}
    request = {"bucket": "cli-bucket", "object": "480P.mp4", "output_dir": "c", "dst_format": "flv"}
    done = subprocess.run(
        [
            *cli,
            "submit",
            "-e",
            json.dumps(request),
            "--invocation-id",
            "cli_wait",
            "--wait",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded" and record["outputs"][0]["key"] == "c/480P.flv"
    again = subprocess.run(
        [*cli, "submit", "-e", json.dumps(request), "--invocation-id", "cli_wait"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert again.returncode == 0 and "already exists" in again.stderr
    failing = subprocess.run(
        [
            *cli,
            "submit",
            "--bucket",
            "cli-bucket",
            "--object",
            "missing.mp4",
            "--to",
            "mov",
            "--wait",
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    assert failing.returncode == 1 and "ObjectNotFound" in failing.stdout
