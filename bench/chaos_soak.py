"""Chaos soak: N short jobs through 3 real workers while a random worker is SIGKILLed (its
whole process group) and restarted every ~10 s, and Redis is restarted once.

Everything runs here: its own `redis-server` (appendonly everysec as in compose, a spare port;
the restart is a crash: SIGKILL), a moto_server, and
`celery -A tasks worker` processes with lowered leases (tests/workers.py FAST_ENV). At the end
it prints a table and exits 1 unless: every job succeeded, each with exactly one success
delivery (`redis-list:`), 0 lost, 0 duplicated outputs, 0 orphan ffmpeg, 0 leftover work dirs.

    python bench/chaos_soak.py                 # 200 jobs
    python bench/chaos_soak.py --jobs 30       # the CI version (tests/test_chaos.py)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import generate_media, start_moto  # noqa: E402
from test_faults import RedisServer  # noqa: E402
from workers import FAST_ENV, Worker, ffmpeg_processes  # noqa: E402

from transcoder import keys, service  # noqa: E402
from transcoder.models import JobState  # noqa: E402
from transcoder.settings import Settings  # noqa: E402

SUCCESS_LIST = "soak:success"
BUCKET = "soak"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="number of jobs (default 200)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--kill-every-s", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--clip-s", type=float, default=3.0, help="source length (default 3)")
    parser.add_argument("--timeout-s", type=float, default=0, help="give up after (0: auto)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    return parser.parse_args()


class Chaos(threading.Thread):
    """Kills a random worker every `every_s` seconds and starts a replacement; restarts Redis
    once, when about a third of the jobs are done."""

    def __init__(
        self,
        pool: list[Worker],
        redis_server: RedisServer,
        every_s: float,
        progress: Callable[[], float],
        running_on: Callable[[], set[str]],
        rng: random.Random,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.pool, self.redis_server, self.every_s = pool, redis_server, every_s
        self.running_on = running_on
        self.progress, self.rng = progress, rng
        self.kills = 0
        self.kills_mid_job = 0
        self.redis_restarts = 0
        self.events: list[str] = []
        self.stop = threading.Event()
        self._generation = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        started = time.monotonic()
        next_kill = started + self.every_s
        while not self.stop.wait(0.2):
            if self.redis_restarts == 0 and self.progress() >= 1 / 3:
                # a crash, not a clean shutdown: the last second of writes may be lost
                self.redis_server.restart(down_s=1.0, crash=True)
                self.redis_restarts += 1
                self.events.append(f"{time.monotonic() - started:6.1f}s redis crashed (SIGKILL)")
            if time.monotonic() >= next_kill:
                next_kill = time.monotonic() + self.every_s
                self._kill_one(started)

    def _kill_one(self, started: float) -> None:
        with self.lock:
            alive = [worker for worker in self.pool if worker.alive()]
            if not alive:
                return
            # a worker in the middle of a job, when there is one: that is the interesting kill
            try:
                running = self.running_on()
            except Exception:  # Redis restarting
                running = set()
            busy_workers = [worker for worker in alive if worker.hostname in running]
            victim = self.rng.choice(busy_workers or alive)
            busy = victim in busy_workers
            victim.kill()
            self.kills += 1
            self.kills_mid_job += busy
            self._generation += 1
            fresh = Worker(f"{victim.name.split('-')[0]}-{self._generation}", victim.env,
                           victim.log_path.parent).start()  # fmt: skip
            self.pool[self.pool.index(victim)] = fresh
            self.events.append(
                f"{time.monotonic() - started:6.1f}s killed {victim.hostname}, "
                f"started {fresh.hostname}"
            )


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    work_dir = scratch / "work"
    work_dir.mkdir()
    redis_server = RedisServer(scratch / "redis").start()
    moto = start_moto()
    env = {
        **moto.env(),
        **FAST_ENV,
        "TRANSCODER_REDIS_URL": redis_server.url(),
        "TRANSCODER_WORK_DIR": str(work_dir),
        "TRANSCODER_ON_SUCCESS": f"redis-list:{SUCCESS_LIST}",
        "TRANSCODER_MAX_RETRIES": "5",
    }
    settings = Settings(
        **{key.removeprefix("TRANSCODER_").lower(): value for key, value in env.items()}  # type: ignore[arg-type]
    )
    pool = [Worker(f"w{n}", env, scratch) for n in range(args.workers)]
    chaos: Chaos | None = None
    keep_scratch = True  # for a post-mortem, unless every check passes
    started = time.monotonic()
    try:
        source = generate_media(scratch / "clip.mp4", duration_s=args.clip_s, size="320x240")
        client = moto.client()
        client.make_bucket(BUCKET)
        client.fput_object(BUCKET, "clip.mp4", str(source))
        for worker in pool:
            worker.start()
        for worker in pool:
            worker.wait_ready()
        ids = [f"soak_{n:04d}" for n in range(args.jobs)]
        store = service.get_store(settings)

        def finished_count() -> int:
            return sum(1 for job_id in ids if _finished(store, job_id))

        def progress() -> float:
            return finished_count() / len(ids)

        started = time.monotonic()
        for job_id in ids:
            request = {
                "bucket": BUCKET,
                "object": "clip.mp4",
                "output_dir": f"out/{job_id}",
                "dst_formats": ["mp4", "m3u8"],
                "invocation_id": job_id,
                "copy_policy": "never",  # an encode: each job spends a moment in ffmpeg
            }
            service.submit(request, settings=settings)

        def running_on() -> set[str]:
            running = store.query(state=JobState.RUNNING, limit=100)
            return {record.worker for record in running if record.worker}

        chaos = Chaos(pool, redis_server, args.kill_every_s, progress, running_on, rng)
        chaos.start()
        timeout_s = args.timeout_s or 60 + 3.0 * args.jobs
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and finished_count() < len(ids):
            time.sleep(1)
        chaos.stop.set()
        chaos.join(30)
        elapsed_s = time.monotonic() - started
        # deliveries are asynchronous: give the last ones a moment, then count
        time.sleep(3)
        status = report(args, settings, ids, work_dir, moto, chaos, elapsed_s)
        if status == 0:
            keep_scratch = False
        else:
            print(f"worker logs and Redis data kept in {scratch}")
        return status
    finally:
        if chaos is not None:
            chaos.stop.set()
            with chaos.lock:
                for worker in pool:
                    worker.stop()
        else:
            for worker in pool:
                worker.stop()
        moto.process.terminate()
        moto.process.wait(10)
        redis_server.stop()
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _finished(store, job_id: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        return store.get(job_id).state.finished
    except Exception:  # Redis restarting: not finished yet, as far as we can tell
        return False


def report(args, settings, ids, work_dir, moto, chaos, elapsed_s) -> int:  # type: ignore[no-untyped-def]
    store = service.get_store(settings)
    records = {job_id: store.get(job_id) for job_id in ids}
    states = Counter(record.state.value for record in records.values())
    deliveries = Counter(
        json.loads(raw)["requestContext"]["requestId"]
        for raw in store.client.lrange(SUCCESS_LIST, 0, -1)
    )
    dlq = store.client.llen(keys.DLQ)
    client = moto.client()
    objects = Counter()
    for item in client.list_objects(BUCKET, prefix="out/", recursive=True):
        objects[str(item.object_name).split("/")[1]] += 1
    duplicated = extra = 0
    for job_id, record in records.items():
        recorded = [output.key for output in record.outputs]
        duplicated += len(recorded) - len(set(recorded))
        extra += max(0, objects[job_id] - len(set(recorded)))
    orphans = ffmpeg_processes(work_dir)
    leftovers = sorted(path.name for path in work_dir.iterdir())
    attempts = Counter(record.attempts for record in records.values())
    lost = sum(1 for record in records.values() if not record.state.finished)
    rows = [
        ("jobs", args.jobs, args.jobs),
        ("succeeded", states.get(JobState.SUCCEEDED.value, 0), args.jobs),
        ("failed / other", sum(states.values()) - states.get("succeeded", 0) - lost, 0),
        ("lost (never finished)", lost, 0),
        ("jobs with 1 success delivery", sum(1 for j in ids if deliveries[j] == 1), args.jobs),
        ("jobs with >1 success delivery", sum(1 for j in ids if deliveries[j] > 1), 0),
        ("dead-letter envelopes", dlq, 0),
        ("duplicated outputs", duplicated + extra, 0),
        ("orphan ffmpeg", len(orphans), 0),
        ("leftover work dirs", len(leftovers), 0),
    ]
    info = [
        ("workers", args.workers),
        ("worker kills (with ffmpeg running)", f"{chaos.kills} ({chaos.kills_mid_job})"),
        ("redis restarts", chaos.redis_restarts),
        ("jobs run more than once", sum(n for a, n in attempts.items() if a > 1)),
        ("attempts histogram", dict(sorted(attempts.items()))),
        ("wall time", f"{elapsed_s:.1f} s"),
        ("throughput", f"{args.jobs / elapsed_s:.2f} jobs/s"),
    ]
    width = max(len(name) for name, *_ in rows + info)
    print(f"\nchaos soak: {args.jobs} jobs, {args.workers} workers")
    print(f"{'check'.ljust(width)}  {'got':>8}  {'want':>8}  ok")
    failures = []
    for name, got, want in rows:
        ok = got == want
        failures += [] if ok else [name]
        print(f"{name.ljust(width)}  {got:>8}  {want:>8}  {'yes' if ok else 'NO'}")
    for name, value in info:
        print(f"{name.ljust(width)}  {value}")
    print("\nchaos events:")
    for event in chaos.events:
        print(f"  {event}")
    if leftovers:
        print(f"\nleftover work dirs: {leftovers[:10]}")
    if failures:
        unfinished = [j for j, r in records.items() if r.state != JobState.SUCCEEDED][:10]
        print(f"\nFAILED: {', '.join(failures)}; not succeeded: {unfinished}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
