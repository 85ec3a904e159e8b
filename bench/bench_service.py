"""Benchmarks of the worker service (run: `python bench/bench_service.py [--skip-rss]`).

(a) end-to-end time of one job through the service (submit → succeeded: a real Celery worker,
    moto S3, Redis) against the raw time of the same ffmpeg plan on local files. Target ≤ 1.10x.
(b) the worker's peak RSS (main process + pool child, VmHWM) while stream-copying a ~1 GB
    source, against a small source. Target ≤ 200 MB and flat in the source size.

Needs Redis (db 15 by default, flushed: TRANSCODER_BENCH_REDIS_URL), ffmpeg and moto_server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import redis  # noqa: E402
from conftest import generate_media, start_moto  # noqa: E402
from workers import Worker  # noqa: E402

from transcoder import service  # noqa: E402
from transcoder.models import EncodingOptions  # noqa: E402
from transcoder.plan import build_plan  # noqa: E402
from transcoder.probe import probe  # noqa: E402
from transcoder.settings import Settings  # noqa: E402

REDIS_URL = os.environ.get("TRANSCODER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
BUCKET = "bench"


def run_job(settings: Settings, request: dict, timeout_s: float = 900, show: bool = False) -> float:
    """Submit and poll until the job ends; returns submit → succeeded seconds."""
    started = time.monotonic()
    job_id = service.submit(request, settings=settings).record.id
    while True:
        record = service.get_job(job_id, settings=settings)
        if record.state.finished:
            elapsed = time.monotonic() - started
            assert record.state.value == "succeeded", record.error
            if show and record.started_at and record.finished_at:
                queued_s = (record.started_at - record.created_at).total_seconds()
                attempt_s = (record.finished_at - record.started_at).total_seconds()
                print(
                    f"    job {elapsed:.2f} s: queued {queued_s:.3f} s, attempt {attempt_s:.2f} s"
                )
                for line in service.job_logs(job_id, settings=settings):
                    print("     ", line)
            return elapsed
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(job_id)
        time.sleep(0.02)


def raw_ffmpeg_s(source: Path, fmt: str, options: EncodingOptions, settings: Settings) -> float:
    """The same plan the worker runs, on local files, timed around ffmpeg alone."""
    with tempfile.TemporaryDirectory() as temp:
        temp_dir = Path(temp) / "part"
        temp_dir.mkdir()
        plan = build_plan(
            probe(source, settings),
            [fmt],
            options,
            settings,
            temp_dir=temp_dir,
            out_dir=Path(temp),
            stem=source.stem,
        )
        started = time.monotonic()
        subprocess.run(plan.command, cwd=plan.work_dir, check=True, capture_output=True)
        return time.monotonic() - started


def peak_rss_mb(worker: Worker) -> dict[str, float]:
    """VmHWM (peak RSS) of the worker's main process and of its pool child, in MB.

    Their sum over-counts: the forked child shares the parent's pages and RSS counts them in
    both. ffmpeg is a separate process and is not counted."""
    assert worker.process is not None
    main_pid = worker.process.pid
    children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    peaks: dict[str, float] = {}
    for role, pid in [("main", main_pid), *(("child", int(pid)) for pid in children)]:
        if Path(f"/proc/{pid}/comm").read_text().strip() in ("ffmpeg", "ffprobe"):
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[role] = peaks.get(role, 0) + int(line.split()[1]) / 1024
    return peaks


def big_source(directory: Path, target_bytes: int, name: str) -> Path:
    """A ~target_bytes h264/aac mp4, cheaply: one CBR-padded chunk, concatenated by copy."""
    chunk = directory / "chunk.mp4"
    if not chunk.exists():
        generate_media(
            chunk,
            duration_s=20,
            size="1280x720",
            extra_output_args=(
                "-b:v",
                "40M",
                "-minrate",
                "40M",
                "-maxrate",
                "40M",
                "-bufsize",
                "2M",
                "-x264-params",
                "nal-hrd=cbr",
            ),
        )
    copies = max(1, round(target_bytes / chunk.stat().st_size))
    listing = directory / f"{name}.txt"
    listing.write_text("".join(f"file '{chunk}'\n" for _ in range(copies)))
    path = directory / f"{name}.mp4"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "concat",
            "-safe",
            "0",
            "-i",
            str(listing),
            "-c",
            "copy",
            str(path),
        ],
        check=True,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-rss", action="store_true", help="only benchmark (a)")
    parser.add_argument("--big-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    redis.Redis.from_url(REDIS_URL).flushdb()
    moto = start_moto()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {**moto.env(), "TRANSCODER_REDIS_URL": REDIS_URL, "TRANSCODER_WORK_DIR": str(work / "w")}
    settings = Settings(**{k.removeprefix("TRANSCODER_").lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    s3 = moto.client()
    s3.make_bucket(BUCKET)
    worker = Worker("bench", env, work, concurrency=1).start().wait_ready()
    try:
        # (a) service overhead on a 30 s 480p clip, encoded (copy_policy never) to mp4
        clip = generate_media(work / "clip30.mp4", duration_s=30, size="854x480")
        s3.fput_object(BUCKET, "clip30.mp4", str(clip))
        request = {
            "bucket": BUCKET,
            "object": "clip30.mp4",
            "dst_format": "mp4",
            "copy_policy": "never",
            "output_dir": "out",
        }
        run_job(settings, {**request, "output_dir": "warmup"})
        # interleaved pairs, so a burst of load on the machine hits both sides alike
        options = EncodingOptions(copy_policy="never")
        pairs = []
        for number in range(args.rounds):
            raw_s = raw_ffmpeg_s(clip, "mp4", options, settings)
            service_s = run_job(settings, request, show=number == 0)
            pairs.append((service_s, raw_s))
            print(f"    round {number + 1}: service {service_s:.2f} s, raw {raw_s:.2f} s")
        ratios = sorted(service_s / raw_s for service_s, raw_s in pairs)
        best_service = min(p[0] for p in pairs)
        best_raw = min(p[1] for p in pairs)
        print(
            f"(a) 30 s 480p -> mp4: best service {best_service:.2f} s vs best raw ffmpeg "
            f"{best_raw:.2f} s = {best_service / best_raw:.3f}x; median pair ratio "
            f"{ratios[len(ratios) // 2]:.3f}x (target <= 1.10x)"
        )
        if args.skip_rss:
            return
        # (b) worker memory: small, ~250 MB and ~1 GB sources, stream copy to mov. VmHWM only
        # grows, so equal peaks after the medium and the big job mean memory is flat.
        small = generate_media(work / "small.mp4", duration_s=10, size="1280x720")
        sources = [("small", small)]
        sources.append(("medium", big_source(work, int(args.big_gb * 1024**3 / 4), "medium")))
        sources.append(("big", big_source(work, int(args.big_gb * 1024**3), "big")))
        for name, path in sources:
            s3.fput_object(BUCKET, path.name, str(path), part_size=64 * 1024 * 1024)
            job_s = run_job(settings, {"bucket": BUCKET, "object": path.name, "dst_format": "mov"})
            peaks = peak_rss_mb(worker)
            print(
                f"(b) {name} source {path.stat().st_size / 2**20:.0f} MB ({job_s:.1f} s): worker "
                f"peak RSS main {peaks['main']:.0f} MB, pool child {peaks['child']:.0f} MB"
                " (target: <= 200 MB, flat)"
            )
    finally:
        worker.stop()
        moto.process.terminate()
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
