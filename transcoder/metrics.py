"""Prometheus metrics: workers write counters to Redis, the API process serves `/metrics`.

Workers are separate processes (often on other machines), so nothing is kept in process
memory: `record_job_finished` adds to one Redis hash (`keys.METRICS`), and the collector
reads that hash plus the job store on every scrape.

Hash fields (all plain numbers):

- `finished_total:<state>`          jobs that ended in `<state>`
- `duration_bucket:<le>`            finished jobs whose duration fell in that bucket (NOT
                                    cumulative; the collector accumulates at scrape time)
- `duration_count`, `duration_sum`  histogram count and sum of seconds
- `bytes_in_total`, `bytes_out_total`
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from transcoder import keys
from transcoder.models import JobState

logger = logging.getLogger(__name__)

#: upper bounds (seconds) of the job duration histogram: seconds-long clips to day-long films
DURATION_BUCKETS_S: tuple[float, ...] = (
    1,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    14400,
    43200,
    86400,
    math.inf,
)

#: what `stats()` of the job service returns (see `transcoder.service.stats`)
StatsProvider = Callable[[], Mapping[str, Any]]


def _bucket_label(upper_bound_s: float) -> str:
    return "+Inf" if math.isinf(upper_bound_s) else f"{upper_bound_s:g}"


def record_job_finished(
    redis_client: redis.Redis,
    *,
    state: str,
    duration_s: float,
    bytes_in: int,
    bytes_out: int,
) -> None:
    """Count one finished job (its end state, run time and bytes moved) in the shared hash."""
    duration_s = max(0.0, float(duration_s))
    bucket = next(bound for bound in DURATION_BUCKETS_S if duration_s <= bound)
    pipe = redis_client.pipeline(transaction=False)
    pipe.hincrby(keys.METRICS, f"finished_total:{state}", 1)
    pipe.hincrby(keys.METRICS, f"duration_bucket:{_bucket_label(bucket)}", 1)
    pipe.hincrby(keys.METRICS, "duration_count", 1)
    pipe.hincrbyfloat(keys.METRICS, "duration_sum", duration_s)
    pipe.hincrby(keys.METRICS, "bytes_in_total", max(0, int(bytes_in)))
    pipe.hincrby(keys.METRICS, "bytes_out_total", max(0, int(bytes_out)))
    pipe.execute()


def _number(raw: bytes | str | None) -> float:
    if raw is None:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        return 0.0


class TranscoderCollector(Collector):
    """Builds every `transcoder_*` metric from Redis at scrape time."""

    def __init__(self, redis_client: redis.Redis, stats: StatsProvider | None = None) -> None:
        self.redis = redis_client
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families; a failing source shows as `transcoder_scrape_error 1`."""
        failed = False
        try:
            yield from self._counters()
        except redis.RedisError as exc:
            logger.warning("metrics: cannot read counters: %s", type(exc).__name__)
            failed = True
        try:
            yield from self._live()
        except Exception as exc:  # the scrape must answer even when the job store does not
            logger.warning("metrics: cannot read job states: %s", type(exc).__name__)
            failed = True
        error = GaugeMetricFamily(
            "transcoder_scrape_error", "1 if a source of these metrics could not be read"
        )
        error.add_metric([], 1.0 if failed else 0.0)
        yield error

    def _counters(self) -> Iterator[Metric]:
        raw: dict[bytes, bytes] = self.redis.hgetall(keys.METRICS)  # type: ignore[assignment]
        fields = {(k.decode() if isinstance(k, bytes) else k): _number(v) for k, v in raw.items()}

        finished = CounterMetricFamily(
            "transcoder_jobs_finished", "Jobs that ended, by end state", labels=["state"]
        )
        for name, value in sorted(fields.items()):
            if name.startswith("finished_total:"):
                finished.add_metric([name.split(":", 1)[1]], value)
        yield finished

        cumulative = 0.0
        buckets: list[tuple[str, float]] = []
        for bound in DURATION_BUCKETS_S:
            label = _bucket_label(bound)
            cumulative += fields.get(f"duration_bucket:{label}", 0.0)
            buckets.append((floatToGoString(bound), cumulative))
        duration = HistogramMetricFamily(
            "transcoder_job_duration_seconds", "Run time of finished jobs (start to end)"
        )
        duration.add_metric([], buckets, sum_value=fields.get("duration_sum", 0.0))
        yield duration

        bytes_in = CounterMetricFamily(
            "transcoder_bytes_in", "Bytes of source objects downloaded by finished jobs"
        )
        bytes_in.add_metric([], fields.get("bytes_in_total", 0.0))
        yield bytes_in
        bytes_out = CounterMetricFamily(
            "transcoder_bytes_out", "Bytes of outputs uploaded by finished jobs"
        )
        bytes_out.add_metric([], fields.get("bytes_out_total", 0.0))
        yield bytes_out

    def _live(self) -> Iterator[Metric]:
        stats = self.stats() if self.stats is not None else self.stats_from_indexes()
        by_state: Mapping[str, int] = stats.get("jobs_by_state", {})
        jobs = GaugeMetricFamily("transcoder_jobs", "Jobs in the store, by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield jobs

        depth = GaugeMetricFamily(
            "transcoder_queue_depth", "Jobs waiting in the queue for a worker"
        )
        depth.add_metric([], float(stats.get("queue_depth", 0)))
        yield depth

        progress = GaugeMetricFamily(
            "transcoder_job_progress_percent",
            "Progress of each running job (0-100)",
            labels=["job_id"],
        )
        for record in stats.get("running", []):
            job_id = getattr(record, "id", None)
            if job_id is None and isinstance(record, Mapping):
                job_id = record.get("id")
            percent = getattr(getattr(record, "progress", None), "percent", None)
            if percent is None and isinstance(record, Mapping):
                percent = (record.get("progress") or {}).get("percent")
            if job_id is not None:
                progress.add_metric([str(job_id)], float(percent or 0.0))
        yield progress

    def stats_from_indexes(self) -> dict[str, Any]:
        """Fallback without the job service: counts from the per-state indexes only."""
        pipe = self.redis.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(keys.state_index(state.value))
        counts = pipe.execute()
        by_state = {state.value: int(n) for state, n in zip(JobState, counts, strict=True)}
        return {"jobs_by_state": by_state, "queue_depth": by_state["queued"], "running": []}


def build_registry(
    redis_client: redis.Redis, stats: StatsProvider | None = None
) -> CollectorRegistry:
    """A registry holding only the transcoder collector (no describe-time Redis reads)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TranscoderCollector(redis_client, stats))
    return registry
