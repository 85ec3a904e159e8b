"""The `-progress` parser, and the runner's process handling with stand-in processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import wait_for

from transcoder.errors import (
    CancelledError,
    FfmpegError,
    MediaError,
    StalledError,
    TimeLimitError,
    TranscoderError,
)
from transcoder.runner import ProgressParser, run_ffmpeg


def block(**values: str) -> list[str]:
    return [f"{key}={value}\n" for key, value in values.items()]


def feed(parser: ProgressParser, lines: list[str]):
    events = [parser.feed(line) for line in lines]
    return [event for event in events if event is not None]


def test_a_block_becomes_one_event_with_percent_speed_and_eta() -> None:
    parser = ProgressParser(duration_s=10.0)
    lines = block(frame="50", fps="25.0", out_time_us="2500000", speed="2.5x", progress="continue")

    (event,) = feed(parser, lines)

    assert event.percent == 25.0
    assert event.fps == 25.0
    assert event.speed == 2.5
    assert event.out_time_s == 2.5
    assert event.eta_s == 3.0  # 7.5 s of media left at 2.5x


def test_out_time_ms_is_read_as_microseconds() -> None:
    parser = ProgressParser(duration_s=4.0)
    (event,) = feed(parser, block(out_time_ms="1000000", progress="continue"))
    assert event.out_time_s == 1.0 and event.percent == 25.0


def test_out_time_clock_is_used_when_the_counters_are_missing() -> None:
    parser = ProgressParser(duration_s=100.0)
    (event,) = feed(parser, block(out_time="00:00:30.500000", progress="continue"))
    assert event.out_time_s == 30.5


def test_not_available_values_give_none_not_errors() -> None:
    parser = ProgressParser(duration_s=10.0)
    lines = block(
        fps="N/A",
        out_time_us="N/A",
        out_time_ms="N/A",
        out_time="N/A",
        speed="N/A",
        progress="continue",
    )
    (event,) = feed(parser, lines)
    assert (event.percent, event.fps, event.speed, event.eta_s, event.out_time_s) == (
        0.0,
        None,
        None,
        None,
        0.0,
    )


@pytest.mark.parametrize("duration", [None, 0.0, -5.0, float("nan"), float("inf")])
def test_unknown_or_bogus_duration_keeps_percent_at_zero(duration: float | None) -> None:
    parser = ProgressParser(duration_s=duration)
    (event,) = feed(parser, block(out_time_us="5000000", speed="1x", progress="continue"))
    assert event.percent == 0.0 and event.eta_s is None and event.out_time_s == 5.0


def test_percent_is_clamped_and_never_goes_back() -> None:
    parser = ProgressParser(duration_s=10.0)
    lines = [
        *block(out_time_us="6000000", progress="continue"),
        *block(out_time_us="-300000", progress="continue"),  # negative: ignored
        *block(out_time_us="4000000", progress="continue"),  # going back: ignored
        *block(out_time_us="12000000", progress="continue"),  # past the end: clamped
    ]
    assert [event.percent for event in feed(parser, lines)] == [60.0, 60.0, 60.0, 100.0]


def test_garbage_lines_are_ignored_and_end_has_no_eta() -> None:
    parser = ProgressParser(duration_s=2.0)
    lines = ["\n", "garbage\n", "speed=fastx\n", *block(out_time_us="2000000", progress="end")]
    (event,) = feed(parser, lines)
    assert event.percent == 100.0 and event.speed is None and event.eta_s == 0.0


# --- the runner, with small Python programs standing in for ffmpeg -------------------------

FAKE_FFMPEG = """
import sys, time
for i in range(1, {blocks} + 1):
    print(f"out_time_us={{i * 1000000}}\\nspeed=1x\\nprogress=continue", flush=True)
    time.sleep({pause_s})
print("boom: something failed", file=sys.stderr, flush=True)
time.sleep({tail_sleep_s})
sys.exit({exit_code})
"""


def fake(
    blocks: int = 3, pause_s: float = 0.01, tail_sleep_s: float = 0.0, exit_code: int = 0
) -> list[str]:
    code = FAKE_FFMPEG.format(
        blocks=blocks, pause_s=pause_s, tail_sleep_s=tail_sleep_s, exit_code=exit_code
    )
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as status:
        return "State:\tZ" not in status.read()


def children_of_this_process() -> set[int]:
    return children_of(os.getpid())


def children_of(parent_pid: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent_pid and fields[0] != "Z":
                pids.add(int(entry))
    return pids


def test_runner_yields_events_and_logs_stderr() -> None:
    lines: list[str] = []
    events = list(run_ffmpeg(fake(), duration_s=3.0, stall_timeout_s=10, on_log=lines.append))
    assert [event.percent for event in events] == pytest.approx([33.33, 66.67, 100.0], abs=0.01)
    assert lines == ["boom: something failed"]


def test_nonzero_exit_is_an_ffmpeg_error_with_the_stderr_tail() -> None:
    with pytest.raises(FfmpegError) as caught:
        list(run_ffmpeg(fake(exit_code=1), duration_s=3.0, stall_timeout_s=10))
    assert "boom: something failed" in caught.value.message
    assert "boom" in caught.value.stderr_tail


def test_no_progress_for_the_stall_timeout_is_killed_and_classified() -> None:
    # (other tests' session fixtures, e.g. an S3 server, may be children of this process too)
    before = children_of_this_process()
    started = time.monotonic()
    with pytest.raises(StalledError):
        list(run_ffmpeg(fake(blocks=1, tail_sleep_s=30), duration_s=3.0, stall_timeout_s=0.5))
    assert time.monotonic() - started < 3
    assert children_of_this_process() <= before


def test_files_still_being_written_are_not_a_stall(tmp_path) -> None:
    # no progress lines for 2.5 s, but the output keeps growing (like a final index rewrite)
    code = (
        "import time; print('progress=continue', flush=True)\n"
        "for i in range(25):\n"
        "    open('out.bin', 'ab').write(b'x' * 1000); time.sleep(0.1)\n"
    )
    command = [sys.executable, "-c", code]
    list(run_ffmpeg(command, duration_s=1, stall_timeout_s=1.5, cwd=tmp_path, watch_dir=tmp_path))
    assert (tmp_path / "out.bin").stat().st_size == 25_000


def test_time_limit_kills_and_is_classified() -> None:
    before = children_of_this_process()
    with pytest.raises(TimeLimitError):
        list(
            run_ffmpeg(
                fake(blocks=100, pause_s=0.05), duration_s=100, stall_timeout_s=10, time_limit_s=0.5
            )
        )
    assert children_of_this_process() <= before


def test_cancel_kills_within_two_seconds_even_if_term_is_ignored() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('progress=continue', flush=True); time.sleep(60)"
    )
    stubborn = [sys.executable, "-c", code]
    cancel = threading.Event()
    before = children_of_this_process()
    events = run_ffmpeg(stubborn, duration_s=1.0, stall_timeout_s=60, cancel=cancel)
    next(events)
    (pid,) = children_of_this_process() - before
    cancel.set()
    started = time.monotonic()
    with pytest.raises(CancelledError):
        next(events)
    assert time.monotonic() - started < 2
    assert not alive(pid)


def test_abandoning_the_generator_kills_the_process() -> None:
    before = children_of_this_process()
    events = run_ffmpeg(fake(blocks=100, pause_s=0.05), duration_s=100, stall_timeout_s=10)
    next(events)
    (pid,) = children_of_this_process() - before
    events.close()
    assert not alive(pid)


def test_the_process_dies_with_its_parent() -> None:
    sleeper = "import time; print('progress=continue', flush=True); time.sleep(60)"
    script = (
        "import sys; from transcoder.runner import run_ffmpeg; "
        f"list(run_ffmpeg([sys.executable, '-c', {sleeper!r}], duration_s=1, stall_timeout_s=60))"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        (child,) = wait_for(lambda: children_of(parent.pid), 10, "the stand-in ffmpeg to start")
    finally:
        parent.kill()  # SIGKILL: no finally, no cleanup code runs in the parent
        parent.wait()
    wait_for(lambda: not alive(child), 2, "the orphaned process to die")


@pytest.mark.parametrize(
    ("stderr_line", "error_type"),
    [
        ("[mov,mp4 @ 0x1] stream 0, offset 0x92f7b: partial file", MediaError),
        ("Error writing trailer of file:t.m3u8: Invalid data", FfmpegError),
    ],
)
def test_fatal_messages_fail_the_run_even_with_exit_0(
    stderr_line: str, error_type: type[TranscoderError]
) -> None:
    code = f"import sys; print('progress=end', flush=True); print({stderr_line!r}, file=sys.stderr)"
    with pytest.raises(error_type) as caught:
        list(run_ffmpeg([sys.executable, "-c", code], duration_s=1.0, stall_timeout_s=10))
    assert stderr_line in caught.value.stderr_tail
