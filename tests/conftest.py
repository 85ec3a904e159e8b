"""Shared fixtures: the machine's Redis (own database), a moto S3 server, generated media.

A missing service skips a test locally but FAILS it when `CI` is set, so CI can never pass
by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_media" / "480P.mp4"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: the Redis database number the tests own; flushed before and after each test that uses it
TEST_REDIS_DB = int(os.environ.get("TRANSCODER_TEST_REDIS_DB", "13"))


def missing_service(reason: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"required service missing in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05
):
    """Poll `condition` until it returns something truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def ffmpeg_available() -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            missing_service(f"{tool} is not installed")


def generate_media(
    path: Path,
    *,
    duration_s: float = 2.0,
    size: str = "320x240",
    rate: int = 25,
    video: bool = True,
    audio: bool = True,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    pix_fmt: str = "yuv420p",
    extra_output_args: tuple[str, ...] = (),
) -> Path:
    """Make a test clip with lavfi sources (reproducible, no fixtures shipped)."""
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        args += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={duration_s}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={duration_s}"]
    if video:
        args += ["-c:v", video_codec, "-pix_fmt", pix_fmt]
        if video_codec == "libx264":
            args += ["-preset", "ultrafast"]
    if audio:
        args += ["-c:a", audio_codec]
    args += [*extra_output_args, str(path)]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    return path


@pytest.fixture
def make_media(ffmpeg_available: None, tmp_path: Path) -> Callable[..., Path]:
    """`make_media("name.mp4", duration_s=..., ...)` → a generated clip under tmp_path."""

    def make(name: str, **kwargs: object) -> Path:
        return generate_media(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


@contextmanager
def clean_redis_database() -> Iterator[str]:
    """The machine's Redis on the tests' own database, flushed before and after."""
    import redis

    url = os.environ.get("TRANSCODER_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        missing_service(f"no Redis answers at {url}")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The machine's Redis, on the tests' own database, flushed before and after."""
    with clean_redis_database() as url:
        yield url


class S3Server:
    """A moto_server process: a real S3-compatible HTTP server on a loopback port."""

    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.process = process

    def client(self):  # -> minio.Minio
        from minio import Minio

        return Minio(self.endpoint, access_key="testkey", secret_key="testsecret", secure=False)

    def env(self) -> dict[str, str]:
        return {
            "TRANSCODER_S3_ENDPOINT": self.endpoint,
            "TRANSCODER_S3_ACCESS_KEY": "testkey",
            "TRANSCODER_S3_SECRET_KEY": "testsecret",
            "TRANSCODER_S3_SECURE": "false",
        }


def start_moto(port: int | None = None) -> S3Server:
    executable = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(executable).exists():
        missing_service("moto_server is not installed (pip install 'moto[server]')")
    port = port or free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(answers, 30, "moto_server to listen")
    return S3Server(port, process)


@contextmanager
def running_moto() -> Iterator[S3Server]:
    """A moto_server of its own for the block, stopped after it."""
    server = start_moto()
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto_server for the session; tests use their own buckets."""
    with running_moto() as server:
        yield server
