"""`transcoder run` as a user runs it: the real command line in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, generate_media, wait_for
from test_engine import assert_plays_fully, ffmpeg_processes_using

pytestmark = pytest.mark.usefixtures("ffmpeg_available")
CLI = [sys.executable, "-c", "from transcoder.cli import main; main()", "run"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_the_sample_becomes_every_seed_format(tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = run_cli(SAMPLE, "--to", "mov,flv,avi,m3u8", "--out", out)

    assert result.returncode == 0, result.stderr
    for name in ("480P.mov", "480P.flv", "480P.avi", "480P.m3u8"):
        assert_plays_fully(out / name, 10.0)
    table = [line for line in result.stdout.splitlines() if "480P.mp4" in line]
    assert len(table) == 4
    assert sum("copy" in line for line in table) == 3  # mov, flv, m3u8 remux; avi encodes
    assert "Traceback" not in result.stderr


def test_a_bad_input_fails_with_one_line_and_the_others_still_succeed(tmp_path: Path) -> None:
    good = generate_media(tmp_path / "good.mp4", duration_s=1.0)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    out = tmp_path / "out"

    result = run_cli(bad, good, "--to", "mov", "--out", out)

    assert result.returncode == 1
    # stderr is not a terminal: the reason and nothing else (no progress bar renders)
    assert result.stderr.splitlines() == [
        "error: bad.mp4: MediaError: not a media file (invalid data)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["good.mov"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "mkv"], "error: unsupported format 'mkv'"),
        (["--to", "mov", "--crf", "99"], "error: --crf:"),
        (["--to", "mov", "--copy-policy", "sometimes"], "error: --copy-policy:"),
        (["--to", "flv", "--video-codec", "libx265"], "cannot be written to flv"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli(SAMPLE, *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_inputs_whose_outputs_would_clash_are_a_usage_error(tmp_path: Path) -> None:
    other = tmp_path / "480P.mov"
    other.write_bytes(b"x")
    result = run_cli(SAMPLE, other, "--to", "mov", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "several inputs are named '480P'" in result.stderr


def test_a_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "nope.mp4", "--to", "mov", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "nope.mp4: no such file" in result.stderr


def test_ctrl_c_stops_ffmpeg_and_leaves_nothing(tmp_path: Path) -> None:
    source = generate_media(tmp_path / "long.mp4", duration_s=6.0, size="640x360")
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*CLI, str(source), "--to", "webm,avi", "--copy-policy", "never", "--out", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TRANSCODER_FFMPEG_THREADS": "1"},
    )
    try:
        wait_for(lambda: ffmpeg_processes_using(str(source), (b"ffmpeg",)), 30, "ffmpeg to start")
        process.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        _, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    wait_for(lambda: not ffmpeg_processes_using(str(source)), 2.0, "ffmpeg to exit")
    assert time.monotonic() - interrupted_at < 2.5
    assert list(out.iterdir()) == []


def test_a_source_name_at_the_file_system_limit_still_gets_every_output(tmp_path: Path) -> None:
    source = generate_media(tmp_path / ("é" * 125 + "x.mp4"), duration_s=0.5)  # 255 bytes
    out = tmp_path / "out"

    result = run_cli(source, "--to", "m3u8,webm", "--out", out)

    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir() if not p.name.endswith(".ts"))
    assert names == ["é" * 125 + ".m3u8", "é" * 125 + ".webm"]  # the stem lost its last "x"
    assert all(len(name.encode()) <= 255 for name in names)
