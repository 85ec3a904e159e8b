"""Upload webhook latency: from a posted bucket-notification event to the job running.

Starts, on loopback: a moto S3 server, one `celery -A tasks worker`, and `transcoder api`;
uploads one small clip, then posts N MinIO-format events (distinct eTags, so N jobs), one at
a time, and measures `started_at` (set by the worker when the job starts) minus the moment
the POST was sent. Prints p50/p95/max; target p50 <= 150 ms.

    python bench/bench_hook.py [--events 50] [--redis redis://127.0.0.1:6379/9]

The Redis database given (default 9) must be empty (or pass --flush); it is flushed after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, generate_media, start_moto, wait_for  # noqa: E402

from transcoder import keys  # noqa: E402

TOKEN = "bench-token"


def event(key: str, etag: str) -> dict:
    return {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"bench/{key}",
        "Records": [
            {
                "eventName": "s3:ObjectCreated:Put",
                "eventTime": datetime.now(UTC).isoformat(),
                "s3": {
                    "bucket": {"name": "bench"},
                    "object": {
                        "key": key,
                        "eTag": etag,
                        "size": 1,
                        "userMetadata": {"content-type": "video/mp4"},
                    },
                },
            }
        ],
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--flush", action="store_true", help="empty a non-empty Redis db first")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    store = redis.Redis.from_url(args.redis, decode_responses=True)
    if store.dbsize() and not args.flush:
        sys.exit(f"Redis db {args.redis} is not empty (in use?): choose another or pass --flush")
    store.flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hook-"))
    rules = workdir / "triggers.json"
    rules.write_text(
        json.dumps(
            [{"bucket": "bench", "prefix": "in/", "dst_formats": ["mov"], "output_dir": "out"}]
        )
    )
    moto = start_moto()
    env = {
        **os.environ,
        **moto.env(),
        "TRANSCODER_REDIS_URL": args.redis,
        "TRANSCODER_WEBHOOK_TOKEN": TOKEN,
        "TRANSCODER_TRIGGERS": str(rules),
        "TRANSCODER_WORK_DIR": str(workdir / "work"),
        "TRANSCODER_PROGRESS_INTERVAL_S": "0.5",
    }
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker_log = (workdir / "worker.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tasks",
                    "worker",
                    "-E",
                    f"--concurrency={args.concurrency}",
                    "--loglevel=INFO",
                    "-n",
                    "bench@%h",
                ],
                cwd=ROOT,
                env=env,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from transcoder.cli.serve import api_command as a; "
                    f"a(host='127.0.0.1', port={port}, log_level='warning')",
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        )
        client = moto.client()
        client.make_bucket("bench")
        source = generate_media(workdir / "clip.mp4", duration_s=0.5, size="160x120")
        client.fput_object("bench", "in/clip.mp4", str(source))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

        def api_up() -> bool:
            try:
                return http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(api_up, 30, "the API")

        def run_one(index: int) -> tuple[float, float]:
            sent = time.time()
            response = http.post(
                "/hooks/s3",
                json=event("in/clip.mp4", f"etag{index:04d}"),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            answered = time.time()
            response.raise_for_status()
            (job,) = response.json()["jobs"]

            def started() -> float | None:
                raw = store.get(keys.job(job["id"]))
                if raw is None:
                    return None
                started_at = json.loads(raw).get("started_at")
                return datetime.fromisoformat(started_at).timestamp() if started_at else None

            started_at = wait_for(started, 60, f"job {job['id']} to start", interval_s=0.005)
            # let the job finish so the next one meets an idle worker, as an upload would
            wait_for(
                lambda: (
                    json.loads(store.get(keys.job(job["id"])) or "{}").get("state")
                    in ("succeeded", "failed", "stopped", "expired", "invalid")
                ),
                120,
                "the job to end",
                interval_s=0.02,
            )
            return (answered - sent) * 1000, (started_at - sent) * 1000

        run_one(-1)  # warm-up: worker pool, imports, connections
        hook_ms, start_ms = zip(*(run_one(index) for index in range(args.events)), strict=True)
        result = {
            "events": args.events,
            "hook_answer_ms": {
                "p50": round(statistics.median(hook_ms), 1),
                "p95": round(percentile(list(hook_ms), 0.95), 1),
            },
            "event_to_running_ms": {
                "p50": round(statistics.median(start_ms), 1),
                "p95": round(percentile(list(start_ms), 0.95), 1),
                "max": round(max(start_ms), 1),
            },
            "target_p50_ms": 150,
        }
        print(json.dumps(result, indent=2))
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_hook.json").write_text(json.dumps(result, indent=2))
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        moto.process.terminate()
        moto.process.wait(10)
        store.flushdb()


if __name__ == "__main__":
    main()
