"""Metrics: workers count finished jobs in Redis; the collector turns that into Prometheus."""

from __future__ import annotations

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from transcoder.metrics import build_registry, record_job_finished

pytestmark = pytest.mark.integration


def samples(registry) -> dict[tuple[str, tuple], float]:  # type: ignore[no-untyped-def]
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_finished_jobs_feed_the_histogram_and_byte_counters(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    record_job_finished(client, state="succeeded", duration_s=42.0, bytes_in=1000, bytes_out=400)
    record_job_finished(client, state="succeeded", duration_s=0.2, bytes_in=10, bytes_out=5)
    record_job_finished(client, state="failed", duration_s=4000, bytes_in=7, bytes_out=0)
    values = samples(build_registry(client))

    assert values[("transcoder_jobs_finished_total", (("state", "succeeded"),))] == 2
    assert values[("transcoder_jobs_finished_total", (("state", "failed"),))] == 1
    bucket = "transcoder_job_duration_seconds_bucket"
    assert values[(bucket, (("le", "1.0"),))] == 1  # cumulative buckets
    assert values[(bucket, (("le", "60.0"),))] == 2
    assert values[(bucket, (("le", "3600.0"),))] == 2
    assert values[(bucket, (("le", "7200.0"),))] == 3
    assert values[(bucket, (("le", "+Inf"),))] == 3
    assert values[("transcoder_job_duration_seconds_count", ())] == 3
    assert values[("transcoder_job_duration_seconds_sum", ())] == pytest.approx(4042.2)
    assert values[("transcoder_bytes_in_total", ())] == 1017
    assert values[("transcoder_bytes_out_total", ())] == 405
    assert values[("transcoder_jobs", (("state", "queued"),))] == 0
    assert values[("transcoder_scrape_error", ())] == 0


def test_running_jobs_progress_and_queue_depth_come_from_the_service_stats(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)

    def stats() -> dict:
        return {
            "jobs_by_state": {"running": 2, "queued": 3},
            "queue_depth": 3,
            "running": [
                {"id": "job_a", "progress": {"percent": 12.5}},
                {"id": "job_b", "progress": {"percent": 80.0}},
            ],
        }

    values = samples(build_registry(client, stats))
    assert values[("transcoder_jobs", (("state", "running"),))] == 2
    assert values[("transcoder_queue_depth", ())] == 3
    assert values[("transcoder_job_progress_percent", (("job_id", "job_a"),))] == 12.5
    assert values[("transcoder_job_progress_percent", (("job_id", "job_b"),))] == 80.0


def test_a_failing_source_is_reported_not_raised(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    record_job_finished(client, state="succeeded", duration_s=1, bytes_in=1, bytes_out=1)

    def broken() -> dict:
        raise redis.ConnectionError("down")

    values = samples(build_registry(client, broken))
    assert values[("transcoder_scrape_error", ())] == 1
    assert values[("transcoder_bytes_in_total", ())] == 1  # what could be read still is
