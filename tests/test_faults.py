"""Infrastructure faults with real workers: each must end with the job done exactly once (or a
clean classified failure), never a lost job, a duplicate delivery or a wedged worker.

The module runs its own `redis-server` (appendonly, on a spare port: it gets restarted), its
own moto_server behind a TCP proxy that can throttle or cut the workers' S3 traffic, and
`celery -A tasks worker` processes with lowered leases and timeouts (`workers.FAST_ENV`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    S3Server,
    free_port,
    generate_media,
    missing_service,
    running_moto,
    wait_for,
)
from workers import FAST_ENV, Worker, ffmpeg_processes, worker_pool

from transcoder import keys, service
from transcoder.errors import JobNotFoundError
from transcoder.models import JobRecord, JobState
from transcoder.settings import Settings

pytestmark = pytest.mark.integration


# --- the module's own services ------------------------------------------------------------


class RedisServer:
    """A `redis-server` of the test's own: spare port, AOF on, restartable with its data."""

    def __init__(self, directory: Path, *, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            missing_service("redis-server is not installed")
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), socket_timeout=5)

    def start(self) -> RedisServer:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",  # as docker/docker-compose.yml runs it (Redis's default)
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                return bool(self.client().ping())
            except redis.exceptions.RedisError:
                return False

        wait_for(answers, 20, f"redis-server on port {self.port}", interval_s=0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: Redis writes its AOF and exits, like a service restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def restart(self, down_s: float = 0.0, *, crash: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL for a crash: up to 1 s of writes lost) and start again."""
        if crash and self.process is not None:
            self.process.kill()
            self.process.wait(20)
        self.stop()
        time.sleep(down_s)  # the outage itself is what is being tested
        self.start()


class TcpProxy:
    """A loopback TCP proxy the workers reach S3 through: it can throttle (to stretch a
    download or an upload long enough to hit it) and go down (refuse and cut connections)."""

    def __init__(self, upstream_port: int, *, rate_bytes_per_s: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.rate_bytes_per_s = rate_bytes_per_s
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones: S3 is gone."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(16384):
                target.sendall(data)
                if self.rate_bytes_per_s:
                    time.sleep(len(data) / self.rate_bytes_per_s)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._connections.discard(source)


class HookServer:
    """A local HTTP destination that answers 500 to the first `failures` POSTs (of each job,
    with `per_job`), then 200."""

    def __init__(self, failures: int, *, per_job: bool = False, hold_first: bool = False) -> None:
        self.failures = failures
        self.requests: list[tuple[int, dict[str, Any]]] = []  # (status answered, body)
        #: with `hold_first`, the first POST is answered only once this is set
        self.release = threading.Event()
        self.arrived = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hold_first and not hook.arrived.is_set():
                    hook.arrived.set()
                    hook.release.wait(30)
                job_id = body["requestContext"]["requestId"]
                earlier = [b for _, b in hook.requests]
                if per_job:
                    earlier = [b for b in earlier if b["requestContext"]["requestId"] == job_id]
                status = 500 if len(earlier) < hook.failures else 200
                hook.requests.append((status, body))
                with contextlib.suppress(OSError):  # the sender may be dead by now
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> list[tuple[int, dict[str, Any]]]:
        return [(c, b) for c, b in self.requests if b["requestContext"]["requestId"] == job_id]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/transcoded"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto(ffmpeg_available: None) -> Iterator[S3Server]:
    with running_moto() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(moto: S3Server) -> TcpProxy:
    return TcpProxy(moto.port)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("work")


def worker_env(
    redis_server: RedisServer, moto: S3Server, endpoint: str, work: Path, db: int = 0
) -> dict:
    """A worker's environment; another `db` is another service (its own queue and jobs)."""
    return {
        **moto.env(),
        **FAST_ENV,
        "TRANSCODER_S3_ENDPOINT": endpoint,
        "TRANSCODER_REDIS_URL": redis_server.url(db),
        "TRANSCODER_WORK_DIR": str(work),
        "TRANSCODER_MAX_RETRIES": "3",
        "TRANSCODER_DELIVERY_MAX_ATTEMPTS": "6",
    }


@pytest.fixture(scope="module")
def env(redis_server: RedisServer, moto: S3Server, proxy: TcpProxy, work_dir: Path) -> dict:
    return worker_env(redis_server, moto, proxy.endpoint, work_dir)


def settings_for(env: dict[str, str]) -> Settings:
    names = {key.removeprefix("TRANSCODER_").lower(): value for key, value in env.items()}
    return Settings(**names)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> Settings:
    return settings_for(env)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def workers(env: dict[str, str], logs: Path) -> Iterator[list[Worker]]:
    """Two workers for the module; a test that kills one starts its replacement."""
    with worker_pool(("w1", "w2"), env, logs) as pool:
        yield pool


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip(media: Path) -> Path:
    """A 12 s 640x360 clip of a few MB: long enough to hit each phase of a job."""
    return generate_media(
        media / "clip.mp4",
        duration_s=12,
        size="640x360",
        extra_output_args=("-b:v", "2500k", "-g", "25"),
    )


# --- helpers --------------------------------------------------------------------------------


def upload(moto: S3Server, bucket: str, key: str, path: Path) -> None:
    client = moto.client()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.fput_object(bucket, key, str(path))


def submit(settings: Settings, job_id: str, bucket: str, **fields: Any) -> str:
    request = {
        "bucket": bucket,
        "object": "clip.mp4",
        "output_dir": job_id,
        "dst_formats": ["mp4", "m3u8"],
        "invocation_id": job_id,
        "on_success": f"redis-list:success:{job_id}",
        **fields,
    }
    assert service.submit(request, settings=settings).created
    return job_id


def record(settings: Settings, job_id: str) -> JobRecord:
    return service.get_job(job_id, settings=settings)


def wait_phase(settings: Settings, job_id: str, phase: str, timeout_s: float = 60) -> JobRecord:
    def reached() -> JobRecord | None:
        found = record(settings, job_id)
        if found.state.finished:
            raise AssertionError(f"{job_id} ended ({found.state}) before reaching {phase}")
        running = found.state == JobState.RUNNING and found.progress.phase == phase
        return found if running else None

    return wait_for(reached, timeout_s, f"{job_id} to reach {phase}", interval_s=0.05)


def wait_finished(settings: Settings, job_id: str, timeout_s: float = 90) -> JobRecord:
    def done() -> JobRecord | None:
        try:
            found = record(settings, job_id)
        except JobNotFoundError:  # a job made by the worker from a raw message: not yet
            return None
        return found if found.state.finished else None

    return wait_for(done, timeout_s, f"{job_id} to finish", interval_s=0.1)


def success_envelopes(settings: Settings, job_id: str) -> list[dict]:
    client = service.get_store(settings).client
    return [json.loads(raw) for raw in client.lrange(f"success:{job_id}", 0, -1)]


def dlq_envelopes(settings: Settings, job_id: str) -> list[dict]:
    client = service.get_store(settings).client
    found = [json.loads(raw) for raw in client.lrange(keys.DLQ, 0, -1)]
    return [body for body in found if body["requestContext"]["requestId"] == job_id]


def exactly_one(fetch: Any, what: str) -> dict:
    """The one envelope `fetch()` finds: delivery follows the state change by a moment, and a
    duplicate would follow the first within the same moment."""
    wait_for(fetch, 20, what, interval_s=0.1)
    time.sleep(1.0)  # the window a duplicate delivery would need
    found = fetch()
    assert len(found) == 1, f"{len(found)} x {what}"
    return found[0]


def object_names(moto: S3Server, bucket: str, prefix: str) -> list[str]:
    return sorted(
        str(item.object_name)
        for item in moto.client().list_objects(bucket, prefix=prefix, recursive=True)
    )


def assert_done_exactly_once(
    settings: Settings, moto: S3Server, bucket: str, job_id: str, work: Path, tmp_path: Path
) -> JobRecord:
    """Succeeded; one success envelope (also a little later: nothing is redelivered); the
    outputs in S3 are exactly the recorded ones and they decode; no work dir, no ffmpeg."""
    final = wait_finished(settings, job_id)
    assert final.state == JobState.SUCCEEDED, (
        final.error,
        service.job_logs(job_id, settings=settings),
    )
    exactly_one(lambda: success_envelopes(settings, job_id), f"success envelope of {job_id}")
    assert dlq_envelopes(settings, job_id) == []
    recorded = sorted(output.key for output in final.outputs)
    assert object_names(moto, bucket, f"{job_id}/") == recorded
    playlist = f"{job_id}/clip.m3u8"
    assert playlist in recorded and f"{job_id}/clip.mp4" in recorded
    local = tmp_path / "check"
    local.mkdir(exist_ok=True)
    for key in recorded:
        moto.client().fget_object(bucket, key, str(local / key.rsplit("/", 1)[-1]))
    for name in ("clip.mp4", "clip.m3u8"):
        result = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-i", str(local / name), "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    wait_for(lambda: not ffmpeg_processes(work), 5, "no ffmpeg left in the work dir")

    def no_leftovers() -> bool:
        return not [path for path in work.iterdir() if path.name.startswith(f"{job_id}-")]

    # a killed attempt's dir is swept by the surviving workers within a few reaper intervals
    wait_for(no_leftovers, 10, f"no work dir of {job_id} left behind", interval_s=0.2)
    return final


def replace(pool: list[Worker], victim: Worker) -> None:
    """Start a fresh worker in the killed one's place (a new name: a new host)."""
    fresh = Worker(f"{victim.name}x", victim.env, victim.log_path.parent).start()
    pool[pool.index(victim)] = fresh
    fresh.wait_ready()


def worker_of(pool: list[Worker], found: JobRecord) -> Worker:
    matches = [worker for worker in pool if worker.hostname == found.worker]
    assert matches, f"job runs on {found.worker}, none of {[w.hostname for w in pool]}"
    return matches[0]


# --- the faults -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("down_s", "crash"),
    [(2, False), (6, False), (2, True)],
    ids=["down_2s", "down_6s_beyond_the_lease", "crash_sigkill_2s"],
)
def test_redis_restarted_mid_job_completes_exactly_once(
    down_s: float,
    crash: bool,
    workers: list[Worker],
    settings: Settings,
    redis_server: RedisServer,
    moto: S3Server,
    clip: Path,
    work_dir: Path,
    tmp_path: Path,
) -> None:
    upload(moto, "faults-redis", "clip.mp4", clip)
    job_id = submit(
        settings, f"redis_{'crash' if crash else 'down'}_{down_s}s", "faults-redis",
        copy_policy="never",
    )  # fmt: skip
    wait_phase(settings, job_id, "transcode")

    # 6 s is longer than the lease (3 s): the lease is gone when Redis comes back
    redis_server.restart(down_s=down_s, crash=crash)

    final = assert_done_exactly_once(settings, moto, "faults-redis", job_id, work_dir, tmp_path)
    assert final.attempts in (1, 2)
    for worker in workers:
        assert worker.alive(), worker.log()[-2000:]


def test_s3_down_for_ten_seconds_mid_upload_is_retried(
    workers: list[Worker],
    settings: Settings,
    moto: S3Server,
    proxy: TcpProxy,
    clip: Path,
    work_dir: Path,
    tmp_path: Path,
) -> None:
    upload(moto, "faults-s3", "clip.mp4", clip)
    proxy.rate_bytes_per_s = 2_000_000  # the upload phase lasts a few seconds
    try:
        job_id = submit(settings, "s3_outage", "faults-s3", hls_segment_s=1)
        wait_phase(settings, job_id, "upload")
        proxy.down()
        outage_started = time.monotonic()
        wait_for(
            lambda: record(settings, job_id).state != JobState.RUNNING,
            15,
            "the upload to fail while S3 is down",
        )
        time.sleep(max(0.0, 10 - (time.monotonic() - outage_started)))  # the outage lasts 10 s
    finally:
        proxy.rate_bytes_per_s = None
        if not proxy.is_up:
            proxy.up()

    final = assert_done_exactly_once(settings, moto, "faults-s3", job_id, work_dir, tmp_path)
    assert final.attempts >= 2  # the attempt that met the outage, then a retry
    logs = service.job_logs(job_id, settings=settings)
    assert any("StorageError" in line for line in logs), logs


@pytest.mark.parametrize("phase", ["download", "transcode", "upload"])
def test_worker_sigkilled_mid_phase_job_completes_on_another(
    phase: str,
    workers: list[Worker],
    settings: Settings,
    moto: S3Server,
    proxy: TcpProxy,
    clip: Path,
    work_dir: Path,
    tmp_path: Path,
) -> None:
    bucket = "faults-kill"
    upload(moto, bucket, "clip.mp4", clip)
    # slow S3 stretches download and upload; a full encode stretches the transcode
    proxy.rate_bytes_per_s = 1_500_000 if phase != "transcode" else None
    try:
        job_id = submit(settings, f"kill_{phase}", bucket, copy_policy="never")
        running = wait_phase(settings, job_id, phase)
        victim = worker_of(workers, running)
        victim.kill()
        proxy.rate_bytes_per_s = None
        replace(workers, victim)
        final = assert_done_exactly_once(settings, moto, bucket, job_id, work_dir, tmp_path)
    finally:
        proxy.rate_bytes_per_s = None
    assert final.worker != victim.hostname
    assert final.attempts == 2


def test_success_webhook_answering_500_is_retried_and_delivered_once(
    workers: list[Worker], settings: Settings, moto: S3Server, clip: Path
) -> None:
    hook = HookServer(failures=3)
    try:
        upload(moto, "faults-hook", "clip.mp4", clip)
        job_id = submit(settings, "hook_500", "faults-hook", on_success=hook.url)
        final = wait_finished(settings, job_id)
        assert final.state == JobState.SUCCEEDED

        def delivered() -> JobRecord | None:
            found = record(settings, job_id)
            statuses = [d for d in found.destinations if d.condition == "Success"]
            return found if statuses and statuses[-1].status == "delivered" else None

        done = wait_for(delivered, 60, "the success delivery to go through", interval_s=0.2)
        status = [d for d in done.destinations if d.condition == "Success"][-1]
        assert status.attempts == 4
        assert status.uri == hook.url
        time.sleep(2)  # a late duplicate would arrive within the backoff interval
        answered = [code for code, body in hook.requests]
        assert answered == [500, 500, 500, 200]
        assert all(body["requestContext"]["requestId"] == job_id for _, body in hook.requests)
        assert all(body["requestContext"]["condition"] == "Success" for _, body in hook.requests)
        logs = service.job_logs(job_id, settings=settings)
        assert sum("failed (attempt" in line for line in logs) == 3, logs
    finally:
        hook.close()


def test_worker_killed_while_delivering_the_success_still_delivers_it(
    workers: list[Worker], settings: Settings, moto: S3Server, clip: Path
) -> None:
    """The job is done, its worker is inside the webhook call: SIGKILL. The success must
    still reach the destination (SPEC §5: one destination delivery, however workers die)."""
    hook = HookServer(failures=0, hold_first=True)
    try:
        upload(moto, "faults-deliver", "clip.mp4", clip)
        job_id = submit(settings, "killed_delivering", "faults-deliver", on_success=hook.url)
        assert hook.arrived.wait(60), "the success delivery never started"
        final = record(settings, job_id)
        assert final.state == JobState.SUCCEEDED
        victim = worker_of(workers, final)
        victim.kill()
        hook.release.set()
        replace(workers, victim)

        def delivered() -> bool:
            statuses = [
                d for d in record(settings, job_id).destinations if d.condition == "Success"
            ]
            return bool(statuses) and statuses[-1].status == "delivered" and len(hook.requests) >= 2

        wait_for(delivered, 20, "the success envelope to be delivered again", interval_s=0.2)
    finally:
        hook.close()


def test_a_job_that_kills_every_worker_ends_failed_and_nothing_else_is_lost(
    workers: list[Worker], settings: Settings, moto: S3Server, clip: Path
) -> None:
    """A poison job (every attempt's worker dies: OOM, segfault) is not retried forever: after
    the retry budget (TRANSCODER_MAX_RETRIES=3 here) it fails once into the dead letters, and
    a job submitted beside it succeeds."""
    upload(moto, "faults-poison", "clip.mp4", clip)
    poison = submit(settings, "poison", "faults-poison", copy_policy="never")
    kills = 0
    started: set[int] = set()

    def killed_each_attempt() -> bool:
        nonlocal kills
        found = record(settings, poison)
        if found.state.finished:
            return True
        if found.state == JobState.RUNNING and found.attempts not in started and found.worker:
            matches = [worker for worker in workers if worker.hostname == found.worker]
            if matches:
                started.add(found.attempts)
                matches[0].kill()
                kills += 1
                replace(workers, matches[0])
        return False

    wait_for(killed_each_attempt, 120, "the poison job to end", interval_s=0.1)
    bystander = submit(settings, "poison_bystander", "faults-poison")
    final = record(settings, poison)

    assert final.state == JobState.FAILED, final
    assert kills == 4 and final.attempts == 4  # the first run and three retries
    exactly_one(lambda: dlq_envelopes(settings, poison), "the poison job's dead letter")
    assert object_names(moto, "faults-poison", "poison/") == []
    assert wait_finished(settings, bystander).state == JobState.SUCCEEDED


@pytest.fixture
def tiny_work_dir(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs as the work dir (root only; otherwise skipped, or failed in CI)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        missing_service(f"cannot mount a tmpfs for the disk-full test: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_work_dir_disk_full_fails_cleanly_and_the_worker_goes_on(
    redis_server: RedisServer,
    moto: S3Server,
    tiny_work_dir: Path,
    media: Path,
    logs: Path,
    tmp_path: Path,
) -> None:
    env = {
        **worker_env(redis_server, moto, moto.endpoint, tiny_work_dir, db=1),
        # let the free-disk check pass so ffmpeg itself runs out of space
        "TRANSCODER_MIN_FREE_DISK_BYTES": "0",
        "TRANSCODER_MAX_RETRIES": "1",
    }
    settings = settings_for(env)
    worker = Worker("tiny", env, logs).start()
    try:
        # 2 MB that grows to far more than 6 MiB: a fixed high bitrate, two outputs
        big = generate_media(media / "fills.mp4", duration_s=8, size="640x360")
        upload(moto, "faults-disk", "clip.mp4", big)
        small = generate_media(media / "small.mp4", duration_s=1, size="160x120")
        upload(moto, "faults-disk", "small/clip.mp4", small)
        worker.wait_ready()
        job_id = submit(
            settings,
            "disk_full",
            "faults-disk",
            copy_policy="never",
            video_bitrate="20M",
        )

        final = wait_finished(settings, job_id, timeout_s=90)

        assert final.state == JobState.FAILED, final
        assert final.error is not None
        assert final.error.type in ("InsufficientDisk", "FfmpegError"), final.error
        assert "space" in final.error.message.lower(), final.error.message
        exactly_one(lambda: dlq_envelopes(settings, job_id), f"dead letter of {job_id}")
        assert success_envelopes(settings, job_id) == []
        assert object_names(moto, "faults-disk", f"{job_id}/") == []
        assert list(tiny_work_dir.iterdir()) == []
        assert ffmpeg_processes(tiny_work_dir) == []

        # the worker is not wedged: the next job (it fits) succeeds
        next_id = submit(settings, "after_disk_full", "faults-disk", object="small/clip.mp4")
        after = wait_finished(settings, next_id, timeout_s=60)
        assert after.state == JobState.SUCCEEDED, after.error
        assert list(tiny_work_dir.iterdir()) == []
    finally:
        worker.stop()


def test_too_little_free_disk_is_refused_before_download(
    redis_server: RedisServer, moto: S3Server, media: Path, logs: Path, tmp_path: Path
) -> None:
    """The free-disk check: a source that cannot fit is refused before a byte is written."""
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **worker_env(redis_server, moto, moto.endpoint, work, db=2),
        "TRANSCODER_MIN_FREE_DISK_BYTES": str(2**60),
        "TRANSCODER_MAX_RETRIES": "0",
    }
    settings = settings_for(env)
    worker = Worker("nodisk", env, logs).start()
    try:
        upload(moto, "faults-nodisk", "clip.mp4", generate_media(media / "nd.mp4", duration_s=1))
        worker.wait_ready()
        job_id = submit(settings, "no_disk", "faults-nodisk")
        final = wait_finished(settings, job_id, timeout_s=60)
        assert final.state == JobState.FAILED
        assert final.error is not None and final.error.type == "InsufficientDisk"
        exactly_one(lambda: dlq_envelopes(settings, job_id), f"dead letter of {job_id}")
        assert list(work.iterdir()) == []
    finally:
        worker.stop()


class LimitedWorker:
    def __init__(self, settings: Settings, work: Path, proxy: TcpProxy) -> None:
        self.settings, self.work, self.proxy = settings, work, proxy


@pytest.fixture(scope="module")
def limited(
    redis_server: RedisServer,
    moto: S3Server,
    clip: Path,
    logs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LimitedWorker]:
    """A worker (its own queue: db 3) with tight limits, reaching S3 through its own proxy."""
    work = tmp_path_factory.mktemp("limited-work")
    proxy = TcpProxy(moto.port)
    env = {
        **worker_env(redis_server, moto, proxy.endpoint, work, db=3),
        "TRANSCODER_JOB_TIME_LIMIT_S": "3",
        "TRANSCODER_FFMPEG_THREADS": "1",
        "TRANSCODER_MAX_SOURCE_BYTES": str(clip.stat().st_size + 1000),
    }
    worker = Worker("limited", env, logs).start()
    upload(moto, "faults-limit", "clip.mp4", clip)
    # a minute of video: its encode on one thread lasts far longer than the 3 s limit
    long = generate_media(
        work.parent / "long.mp4", duration_s=60, size="640x360", extra_output_args=("-b:v", "300k")
    )
    upload(moto, "faults-limit", "long.mp4", long)
    big = moto.client()
    big.put_object("faults-limit", "too-big.mp4", io.BytesIO(b"\0" * (clip.stat().st_size + 2000)),
                   clip.stat().st_size + 2000)  # fmt: skip
    worker.wait_ready()
    yield LimitedWorker(settings_for(env), work, proxy)
    worker.stop()


def assert_failed_once_cleanly(
    limited: LimitedWorker, moto: S3Server, job_id: str, error_type: str
) -> JobRecord:
    final = wait_finished(limited.settings, job_id, timeout_s=60)
    assert final.state == JobState.FAILED
    assert final.error is not None and final.error.type == error_type, final.error
    assert final.attempts == 1
    exactly_one(lambda: dlq_envelopes(limited.settings, job_id), f"dead letter of {job_id}")
    assert object_names(moto, "faults-limit", f"{job_id}/") == []
    assert ffmpeg_processes(limited.work) == []
    assert list(limited.work.iterdir()) == []
    return final


def test_job_time_limit_kills_ffmpeg_and_fails_once(limited: LimitedWorker, moto: S3Server) -> None:
    """The per-job wall-clock limit and the thread count."""
    settings = limited.settings
    job_id = submit(settings, "time_limit", "faults-limit", object="long.mp4", copy_policy="never")
    wait_phase(settings, job_id, "transcode")
    running = wait_for(lambda: ffmpeg_processes(limited.work), 10, "ffmpeg to run")
    cmdline = Path(f"/proc/{running[0]}/cmdline").read_bytes().split(b"\0")

    final = assert_failed_once_cleanly(limited, moto, job_id, "TimeLimitError")

    assert b"-threads" in cmdline and cmdline[cmdline.index(b"-threads") + 1] == b"1"
    # SPEC §4: the record holds the ffmpeg command line, also (above all) for a failure
    assert final.commands, "the failed job's record has no ffmpeg command line"


def test_a_source_above_the_size_limit_is_refused_before_download(
    limited: LimitedWorker, moto: S3Server
) -> None:
    job_id = submit(limited.settings, "too_big", "faults-limit", object="too-big.mp4")

    final = assert_failed_once_cleanly(limited, moto, job_id, "SourceTooLargeError")

    assert "limit" in final.error.message if final.error else False


def test_the_wall_clock_limit_also_bounds_a_crawling_download(
    limited: LimitedWorker, moto: S3Server
) -> None:
    """An object store that trickles bytes must not hold a worker past the job's limit."""
    limited.proxy.rate_bytes_per_s = 100_000  # the 4 MB source would take ~40 s
    job_id = submit(limited.settings, "slow_download", "faults-limit")
    try:
        wait_phase(limited.settings, job_id, "download")
        try:
            final = wait_finished(limited.settings, job_id, timeout_s=3 + 10)
        except AssertionError:
            pytest.fail("the job still ran 10 s past its 3 s wall-clock limit (in download)")
    finally:
        limited.proxy.rate_bytes_per_s = None
        if not record(limited.settings, job_id).state.finished:
            service.stop_job(job_id, settings=limited.settings)  # free the worker
            wait_finished(limited.settings, job_id, timeout_s=30)

    assert final.state == JobState.FAILED and final.error is not None
    assert final.error.type == "TimeLimitError", final.error
    assert list(limited.work.iterdir()) == []


def test_stopping_a_job_never_deletes_what_another_job_wrote(
    workers: list[Worker],
    settings: Settings,
    moto: S3Server,
    proxy: TcpProxy,
    clip: Path,
) -> None:
    """The seed's own payloads (my1, my2: both mov into `a/`) share output keys: removing a
    stopped attempt's partial outputs must not remove a finished job's recorded ones."""
    bucket = "faults-shared"
    upload(moto, bucket, "clip.mp4", clip)
    shared = {"output_dir": "shared", "hls_segment_s": 1}
    first = submit(settings, "shared_first", bucket, **shared)
    done = wait_finished(settings, first)
    assert done.state == JobState.SUCCEEDED, done.error
    recorded = sorted(output.key for output in done.outputs)

    proxy.rate_bytes_per_s = 1_000_000  # the second job's upload takes seconds
    try:
        second = submit(settings, "shared_second", bucket, **shared)
        wait_phase(settings, second, "upload")
        service.stop_job(second, settings=settings)
        stopped = wait_finished(settings, second)
    finally:
        proxy.rate_bytes_per_s = None

    assert stopped.state == JobState.STOPPED
    missing = sorted(set(recorded) - set(object_names(moto, bucket, "shared/")))
    assert missing == [], f"a succeeded job's outputs were deleted: {missing}"


def test_a_wedged_ffmpeg_is_killed_as_stalled_and_the_job_retried(
    redis_server: RedisServer,
    moto: S3Server,
    clip: Path,
    logs: Path,
    tmp_path: Path,
) -> None:
    """ffmpeg frozen mid-encode (SIGSTOP: it ignores SIGTERM until continued) must be killed
    by the stall watchdog, classified StalledError (transient) and the job run again."""
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **worker_env(redis_server, moto, moto.endpoint, work, db=4),
        "TRANSCODER_STALL_TIMEOUT_S": "2",
    }
    settings = settings_for(env)
    worker = Worker("stall", env, logs).start()
    try:
        upload(moto, "faults-stall", "clip.mp4", clip)
        worker.wait_ready()
        job_id = submit(settings, "stalled", "faults-stall", copy_policy="never")

        def encoding() -> list[int]:  # ffmpeg itself, not the ffprobe before it
            found = []
            for pid in ffmpeg_processes(work):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "ffmpeg":
                        found.append(pid)
            return found

        frozen = wait_for(encoding, 30, "ffmpeg to start")[0]
        os.kill(frozen, signal.SIGSTOP)

        final = wait_finished(settings, job_id, timeout_s=90)

        logs_text = "\n".join(service.job_logs(job_id, settings=settings))
        assert final.state == JobState.SUCCEEDED, (final.error, logs_text[-2000:])
        assert final.attempts == 2
        assert "StalledError" in logs_text
        assert not Path(f"/proc/{frozen}").exists(), "the frozen ffmpeg is still there"
        exactly_one(lambda: success_envelopes(settings, job_id), "the success envelope")
        assert list(work.iterdir()) == []
    finally:
        worker.stop()
