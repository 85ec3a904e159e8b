"""Run one ffmpeg process: progress events, a bounded log, cancellation, a stall watchdog.

`run_ffmpeg` is a generator of `ProgressEvent`s. Its `finally` always kills a still-running
ffmpeg (and its whole process group), also when the caller abandons the generator. Nothing
here knows about Celery, S3 or formats.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transcoder.errors import (
    CancelledError,
    FfmpegError,
    MediaError,
    StalledError,
    TimeLimitError,
    TranscoderError,
)

#: lines of ffmpeg's stderr kept for error messages
STDERR_TAIL_LINES = 200
#: how long ffmpeg may take to exit after SIGTERM before it gets SIGKILL
TERMINATE_GRACE_S = 1.0
#: how often the watch loop checks cancellation, stall and time limit
POLL_INTERVAL_S = 0.1
_PR_SET_PDEATHSIG = 1

#: stderr messages after which ffmpeg may still exit 0, but its outputs are not usable:
#: a source cut short (outputs shorter than the source, the last packet broken) and an
#: output whose trailer (index, ENDLIST) was never written
FATAL_EVEN_ON_SUCCESS: dict[str, type[TranscoderError]] = {
    ": partial file": MediaError,
    "Error writing trailer": FfmpegError,
}
_FATAL_MESSAGES = {
    ": partial file": "truncated or incomplete file: its data ends before its stated duration",
    "Error writing trailer": "ffmpeg could not finish writing an output",
}


@dataclass
class ProgressEvent:
    """How far ffmpeg got: percent of the probed duration, speed and time left."""

    percent: float
    fps: float | None
    speed: float | None
    eta_s: float | None
    out_time_s: float


def _number(value: str | None) -> float | None:
    """A float from ffmpeg's progress values; None for `N/A`, garbage, NaN or negatives."""
    if value is None:
        return None
    try:
        result = float(value.strip().rstrip("x"))
    except ValueError:
        return None
    return result if math.isfinite(result) and result >= 0 else None


def _clock(value: str | None) -> float | None:
    """`HH:MM:SS.micro` → seconds."""
    if not value:
        return None
    parts = value.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    total = hours * 3600 + minutes * 60 + seconds
    return total if math.isfinite(total) and total >= 0 else None


class ProgressParser:
    """Turns `-progress` key=value lines into events: one per `progress=` line.

    Percent is of `duration_s` (when that is a usable number), clamped to 0..100 and never
    going back; `out_time_ms` is read as microseconds, which is what ffmpeg really writes.
    """

    def __init__(self, duration_s: float | None) -> None:
        usable = duration_s is not None and math.isfinite(duration_s) and duration_s > 0
        self.duration_s = duration_s if usable else None
        self.block: dict[str, str] = {}
        self.percent = 0.0
        self.out_time_s = 0.0
        self.total_size: str | None = None

    def feed(self, line: str) -> ProgressEvent | None:
        """Consume one line; return an event when it closes a progress block."""
        key, sep, value = line.strip().partition("=")
        if not sep:
            return None
        if key != "progress":
            self.block[key.strip()] = value.strip()
            return None
        block, self.block = self.block, {}
        return self._event(block, finished=value.strip() == "end")

    def _event(self, block: dict[str, str], *, finished: bool) -> ProgressEvent:
        out_us = _number(block.get("out_time_us"))
        if out_us is None:
            out_us = _number(block.get("out_time_ms"))  # microseconds despite the name
        out_time_s = out_us / 1e6 if out_us is not None else _clock(block.get("out_time"))
        if out_time_s is not None:
            self.out_time_s = max(self.out_time_s, out_time_s)
        self.total_size = block.get("total_size", self.total_size)
        speed = _number(block.get("speed")) or None
        fps = _number(block.get("fps")) or None  # 0 while starting, or when nothing encodes
        if self.duration_s:
            percent = 100.0 * min(self.out_time_s, self.duration_s) / self.duration_s
            self.percent = max(self.percent, min(percent, 100.0))
        eta_s = None
        if self.duration_s and speed:
            eta_s = max(self.duration_s - self.out_time_s, 0.0) / speed
        if finished:
            eta_s = 0.0
        return ProgressEvent(
            percent=round(self.percent, 2),
            fps=fps,
            speed=speed,
            eta_s=None if eta_s is None else round(eta_s, 1),
            out_time_s=round(self.out_time_s, 3),
        )


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


# looked up once here: between fork and exec only the plain C call may run (no dlopen/dlsym
# while another thread of the parent might hold their locks)
_PRCTL = _load_prctl()


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL the child (ffmpeg, ffprobe) when the thread that started it dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ffmpeg's process group, SIGKILL it after a grace period, and reap it."""
    for sig, wait_s in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # the leader is gone; make sure nothing else of its group lives on
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return


def _dir_signature(directory: Path) -> tuple[int, int]:
    """Total size and newest modification time of the files in `directory`."""
    total_bytes = newest_ns = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return (0, 0)
    for entry in entries:
        try:
            info = entry.stat()
        except OSError:
            continue
        total_bytes += info.st_size
        newest_ns = max(newest_ns, info.st_mtime_ns)
    return (total_bytes, newest_ns)


#: "[mpegts @ 0x5616775c23c0] " → "mpegts: " (the address means nothing to a user)
_CONTEXT_PREFIX = re.compile(r"^\[([^\]@]+?) @ 0x[0-9a-f]+\] ")


def _last_error_line(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith("Conversion failed"):
            return _CONTEXT_PREFIX.sub(r"\1: ", text)[:300]
    return "no message"


def run_ffmpeg(
    command: Sequence[str],
    *,
    duration_s: float | None,
    stall_timeout_s: float,
    cancel: threading.Event | None = None,
    time_limit_s: float | None = None,
    on_log: Callable[[str], None] | None = None,
    cwd: Path | None = None,
    watch_dir: Path | None = None,
) -> Generator[ProgressEvent, None, None]:
    """Run `command` (which must contain `-progress pipe:1`) and yield progress events.

    Raises CancelledError, StalledError, TimeLimitError, or FfmpegError (nonzero exit, with
    the stderr tail). `on_log` is called from a reader thread with each stderr line. Files
    changing in `watch_dir` count as progress too: ffmpeg reports none while it finishes
    its outputs (e.g. moving a big file's index to the front).
    """
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: one killpg reaches everything
        preexec_fn=die_with_parent,  # prctl must run in the child, before exec
        close_fds=True,
        cwd=cwd,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr_lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    fatal_lines: dict[str, str] = {}
    events: queue.Queue[ProgressEvent | None] = queue.Queue()
    parser = ProgressParser(duration_s)

    def read_progress() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            event = parser.feed(raw.decode("utf-8", "replace"))
            if event is not None:
                events.put(event)
        events.put(None)  # stdout closed: ffmpeg is exiting

    def read_stderr() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            stderr_lines.append(line)
            for pattern in FATAL_EVEN_ON_SUCCESS:
                if pattern in line:
                    fatal_lines.setdefault(pattern, line)
            if on_log is not None:
                try:
                    on_log(line)
                except Exception:  # noqa: S110 - a broken log sink must not break the run
                    pass

    readers = [
        threading.Thread(target=read_progress, name="ffmpeg-progress", daemon=True),
        threading.Thread(target=read_stderr, name="ffmpeg-stderr", daemon=True),
    ]
    for reader in readers:
        reader.start()
    started = last_advance = last_scan = time.monotonic()
    last_position: tuple[float, str | None] = (-1.0, None)
    last_signature: tuple[int, int] | None = None
    try:
        while True:
            try:
                event = events.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                event = None
                if process.poll() is not None and not readers[0].is_alive() and events.empty():
                    break
            else:
                if event is None:
                    break
                position = (event.out_time_s, parser.total_size)
                if position != last_position:
                    last_position, last_advance = position, time.monotonic()
                yield event
            now = time.monotonic()
            if watch_dir is not None and now - last_advance > 1.0 and now - last_scan > 1.0:
                last_scan = now
                signature = _dir_signature(watch_dir)
                if signature != last_signature:
                    last_signature, last_advance = signature, now
            if cancel is not None and cancel.is_set():
                kill_group(process)
                raise CancelledError("cancelled: ffmpeg was stopped")
            if now - last_advance > stall_timeout_s:
                kill_group(process)
                raise StalledError(
                    f"ffmpeg made no progress for {stall_timeout_s:g} s and was killed",
                    stderr_tail="\n".join(stderr_lines),
                )
            if time_limit_s is not None and now - started > time_limit_s:
                kill_group(process)
                raise TimeLimitError(f"transcoding exceeded its time limit of {time_limit_s:g} s")
        # stdout is closed; wait for the exit status, still honouring cancellation
        while process.poll() is None:
            if cancel is not None and cancel.is_set():
                kill_group(process)
                raise CancelledError("cancelled: ffmpeg was stopped")
            time.sleep(POLL_INTERVAL_S / 2)
        readers[1].join(timeout=5)
        if process.returncode != 0:
            tail = "\n".join(stderr_lines)
            if process.returncode < 0:
                reason = f"killed by signal {-process.returncode}"
            else:
                reason = _last_error_line(stderr_lines)
            raise FfmpegError(
                f"ffmpeg failed (exit {process.returncode}): {reason}", stderr_tail=tail
            )
        for pattern, error_type in FATAL_EVEN_ON_SUCCESS.items():
            if pattern in fatal_lines:
                message = _FATAL_MESSAGES[pattern]
                raise error_type(message, stderr_tail="\n".join(stderr_lines))
    finally:
        if process.poll() is None:
            kill_group(process)
        # the pipes reach EOF once ffmpeg is gone; close them only after the readers are done
        for reader in readers:
            reader.join(timeout=2)
        if not any(reader.is_alive() for reader in readers):
            process.stdout.close()
            process.stderr.close()
