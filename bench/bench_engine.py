"""Naive per-format ffmpeg runs vs one `transcoder run`, timed side by side in one run.

(a) the seed's five jobs the naive way: one ffmpeg per format with ffmpeg's default codecs
    (mov, mov, flv, avi, and m3u8 in two passes: encode to mp4, then segment it);
(b) `transcoder run SRC --to mov,flv,avi,m3u8` (the real CLI, as a subprocess).

Prints both times and the ratio (b)/(a); the target is <= 0.10.
Usage: python bench/bench_engine.py [--duration-s 30] [--repeat 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 0.10
FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


def make_clip(path: Path, duration_s: float) -> None:
    """A 854x480 H.264/AAC clip (2 s GOP, like typical uploads) from lavfi test sources."""
    subprocess.run(
        [
            *FFMPEG,
            "-f", "lavfi", "-i", f"testsrc2=size=854x480:rate=30:duration={duration_s}",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={duration_s}",
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "60",
            "-c:a", "aac", "-ac", "2", str(path),
        ],
        check=True,
    )  # fmt: skip


def run_naive(source: Path, out_dir: Path) -> float:
    """The five jobs, one ffmpeg each, default codecs; m3u8 as encode + segment."""
    out_dir.mkdir(parents=True, exist_ok=True)
    commands = [
        [*FFMPEG, "-i", str(source), str(out_dir / "a.mov")],
        [*FFMPEG, "-i", str(source), str(out_dir / "b.mov")],
        [*FFMPEG, "-i", str(source), str(out_dir / "c.flv")],
        [*FFMPEG, "-i", str(source), str(out_dir / "d.avi")],
        [*FFMPEG, "-i", str(source), str(out_dir / "e.mp4")],
        [*FFMPEG, "-i", str(out_dir / "e.mp4"), "-c", "copy", "-f", "hls",
         "-hls_playlist_type", "vod", str(out_dir / "e.m3u8")],
    ]  # fmt: skip
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_ours(source: Path, out_dir: Path) -> float:
    """`transcoder run --to mov,flv,avi,m3u8` through the real CLI entry point."""
    command = [
        sys.executable, "-c", "from transcoder.cli import main; main()",
        "run", str(source), "--to", "mov,flv,avi,m3u8", "--out", str(out_dir),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; medians are shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(tmp)
        source = work / "clip.mp4"
        make_clip(source, args.duration_s)
        naive_s, ours_s = [], []
        for attempt in range(args.repeat):
            naive_s.append(run_naive(source, work / f"naive{attempt}"))
            ours_s.append(run_ours(source, work / f"ours{attempt}"))
    naive, ours = statistics.median(naive_s), statistics.median(ours_s)
    ratio = ours / naive
    print(f"source: {args.duration_s:g} s 854x480 h264/aac; median of {args.repeat} run(s)")
    print(f"(a) naive, 6 ffmpeg runs, default codecs : {naive:7.2f} s")
    print(f"(b) transcoder run --to mov,flv,avi,m3u8 : {ours:7.2f} s")
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"ratio (b)/(a) = {ratio:.3f} ({verdict} the target {TARGET_RATIO:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
