"""Helpers for tests that need real `celery -A tasks worker` processes and a test Redis db."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import ROOT, wait_for

#: a worker's settings lowered so leases, reaping and redelivery happen within seconds
FAST_ENV = {
    "TRANSCODER_LEASE_TTL_S": "3",
    "TRANSCODER_HEARTBEAT_INTERVAL_S": "0.5",
    "TRANSCODER_REAPER_INTERVAL_S": "1",
    "TRANSCODER_PROGRESS_INTERVAL_S": "0.5",
    "TRANSCODER_RETRY_MIN_BACKOFF_S": "3",
    "TRANSCODER_RETRY_MAX_BACKOFF_S": "4",
    "TRANSCODER_MAX_RETRIES": "3",
    # far below the test jobs' length: every long job also proves redelivery runs nothing
    "TRANSCODER_VISIBILITY_TIMEOUT_S": "4",
}


class Worker:
    """One `celery -A tasks worker` process group, its log in a file."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 1,
        pool: str = "prefork",
    ) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"worker-{name}.log"
        self.concurrency = concurrency
        self.pool = pool
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hostname(self) -> str:
        return f"{self.name}@test"

    def start(self) -> Worker:
        log = self.log_path.open("ab")
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tasks",
            "worker",
            "-n",
            self.hostname,
            f"--pool={self.pool}",
            f"--concurrency={self.concurrency}",
            "-E",
            "-Q",
            "transcoder",
            "--prefetch-multiplier=1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60) -> Worker:
        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()[-3000:]
            return " ready." in self.log()

        wait_for(ready, timeout_s, f"worker {self.name} to be ready", interval_s=0.2)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the worker, its pool and any ffmpeg."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # cold shutdown: tests do not wait for jobs
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def processes_matching(needle: str) -> list[int]:
    """Pids whose command line contains `needle` (a /proc scan: no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def ffmpeg_processes(work_dir: Path) -> list[int]:
    """ffmpeg/ffprobe processes working inside `work_dir`."""
    return [pid for pid in processes_matching(str(work_dir)) if _comm(pid) in ("ffmpeg", "ffprobe")]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@contextmanager
def worker_pool(
    names: Iterable[str], env: dict[str, str], log_dir: Path, **options: Any
) -> Iterator[list[Worker]]:
    """Started, ready workers for the block; all stopped after it."""
    pool = [Worker(name, env, log_dir, **options) for name in names]
    try:
        for worker in pool:
            worker.start()
        for worker in pool:
            worker.wait_ready()
        yield pool
    finally:
        for worker in pool:
            worker.stop()
