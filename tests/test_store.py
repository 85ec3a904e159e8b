"""The job store against the real Redis: dedup, atomic transitions, leases, log, retention."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from transcoder import keys
from transcoder.errors import InvalidStateError, JobNotFoundError
from transcoder.models import ErrorInfo, JobRecord, JobState, OutputObject
from transcoder.settings import Settings
from transcoder.store import JobStore

REQUEST = {"bucket": "my-bucket", "object": "480P.mp4", "dst_format": "mov"}


@pytest.fixture
def store(redis_url: str) -> JobStore:
    settings = Settings(
        redis_url=redis_url,
        lease_ttl_s=0.5,
        log_max_lines=5,
        max_retries=1,
        record_retention_s=3600,
    )  # type: ignore[arg-type]
    return JobStore.from_settings(settings)


def record(job_id: str = "job_1", **fields: object) -> JobRecord:
    fields.setdefault("created_at", datetime.now(UTC))
    return JobRecord(id=job_id, request=REQUEST, **fields)  # type: ignore[arg-type]


def test_create_is_atomic_under_concurrency(store: JobStore) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(20)

    def submit() -> None:
        barrier.wait()
        results.append(store.create(record("same_id"))[1])

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 1
    assert store.client.zcard(keys.state_index("queued")) == 1


def test_only_one_attempt_starts_and_finishes(store: JobStore) -> None:
    store.create(record())
    assert store.start("job_1", "a", "w1").outcome == "started"
    assert store.start("job_1", "b", "w2").outcome == "busy"  # lease alive elsewhere
    assert store.finish("job_1", "b", JobState.SUCCEEDED)[0] == "lost"
    outcome, done = store.finish(
        "job_1", "a", JobState.SUCCEEDED, outputs=[OutputObject(key="k", size=1)]
    )
    assert outcome == "finished" and done is not None and done.state == JobState.SUCCEEDED
    assert store.finish("job_1", "a", JobState.FAILED)[0] == "lost"
    assert store.start("job_1", "c", "w3").outcome == "finished"
    assert store.get("job_1").attempts == 1
    assert store.client.zscore(keys.state_index("succeeded"), "job_1") is not None
    assert store.client.zscore(keys.state_index("running"), "job_1") is None
    assert 3500 < store.client.ttl(keys.job("job_1")) <= 3600  # retention starts at the finish


def test_expired_lease_is_reaped_and_the_old_attempt_cannot_finish(store: JobStore) -> None:
    store.create(record())
    store.start("job_1", "a", "w1")
    assert store.abandoned() == []
    time.sleep(0.8)  # the lease lapses: worker "w1" died
    assert store.abandoned() == ["job_1"]
    assert store.reap("job_1").outcome == "requeue"
    assert store.get("job_1").state == JobState.RETRYING
    assert store.start("job_1", "b", "w2").outcome == "started"
    assert store.finish("job_1", "a", JobState.SUCCEEDED)[0] == "lost"
    assert not store.renew_lease("job_1", "a") and store.renew_lease("job_1", "b")
    time.sleep(0.8)
    # out of retries (max_retries=1, two attempts used): the job fails as WorkerLost
    outcome = store.reap("job_1")
    assert outcome.outcome == "exhausted" and outcome.record is not None
    assert outcome.record.state == JobState.FAILED and outcome.record.error is not None
    assert outcome.record.error.type == "WorkerLost"


def test_redelivery_of_a_running_job_whose_worker_died_takes_over(store: JobStore) -> None:
    store.create(record())
    store.start("job_1", "a", "w1")
    time.sleep(0.8)
    started = store.start("job_1", "b", "w2")
    assert started.outcome == "started" and started.record is not None
    assert started.record.attempts == 2
    assert [e.event for e in started.record.events][-1] == "takeover"


def test_event_age_exceeded(store: JobStore) -> None:
    old = record(created_at=datetime.now(UTC) - timedelta(hours=7))
    store.create(old)
    outcome = store.start("job_1", "a", "w1")
    assert outcome.outcome == "expired" and outcome.record is not None
    assert outcome.record.state == JobState.EXPIRED and outcome.record.error is not None
    assert outcome.record.error.type == "EventAgeExceeded"
    # an operator retry counts the age from the resubmission
    store.resubmit("job_1")
    assert store.start("job_1", "b", "w1").outcome == "started"


def test_stop_queued_running_and_finished(store: JobStore) -> None:
    store.create(record("queued_1"))
    stopped, finished_now = store.request_stop("queued_1")
    assert finished_now and stopped.state == JobState.STOPPED
    assert store.start("queued_1", "a", "w").outcome == "finished"  # never starts
    with pytest.raises(InvalidStateError):
        store.request_stop("queued_1")

    store.create(record("running_1"))
    store.start("running_1", "a", "w")
    stopping, finished_now = store.request_stop("running_1")
    assert not finished_now and stopping.state == JobState.STOPPING
    assert store.stop_requested("running_1")
    # a success recorded after the stop request is refused: the caller cleans up and stops
    assert store.finish("running_1", "a", JobState.SUCCEEDED)[0] == "stop_requested"
    outcome, done = store.finish("running_1", "a", JobState.STOPPED)
    assert outcome == "finished" and done is not None and done.state == JobState.STOPPED
    assert not store.stop_requested("running_1")
    with pytest.raises(JobNotFoundError):
        store.request_stop("nope")


def test_retry_counts_per_submission(store: JobStore) -> None:
    store.create(record())
    store.start("job_1", "a", "w")
    assert store.can_retry("job_1")  # attempt 1 of 1 + max_retries(1)
    store.retry_later("job_1", "a", ErrorInfo(type="StorageError", message="down"))
    store.start("job_1", "b", "w")
    assert not store.can_retry("job_1")
    store.finish(
        "job_1", "b", JobState.FAILED, error=ErrorInfo(type="StorageError", message="down")
    )
    with pytest.raises(InvalidStateError):
        store.request_stop("job_1")
    again = store.resubmit("job_1")
    assert again.state == JobState.QUEUED and again.attempts == 2
    assert store.client.ttl(keys.job("job_1")) == -1  # alive again: no retention countdown
    store.start("job_1", "c", "w")
    assert store.get("job_1").attempts == 3 and store.can_retry("job_1")


def test_log_is_bounded(store: JobStore) -> None:
    store.create(record())
    for number in range(12):
        store.log("job_1", f"line {number}")
    lines = store.log_lines("job_1")
    assert len(lines) == 5 and lines[-1].endswith("line 11")


def test_query_by_state_and_window_newest_first(store: JobStore) -> None:
    base = datetime.now(UTC) - timedelta(minutes=10)
    for number in range(5):
        store.create(record(f"job_{number}", created_at=base + timedelta(minutes=number)))
    assert [r.id for r in store.query(limit=3)] == ["job_4", "job_3", "job_2"]
    assert [r.id for r in store.query(limit=3, offset=3)] == ["job_1", "job_0"]
    window = store.query(since=base + timedelta(minutes=1), until=base + timedelta(minutes=3))
    assert [r.id for r in window] == ["job_3", "job_2", "job_1"]
    store.request_stop("job_2")
    assert [r.id for r in store.query(state=JobState.STOPPED)] == ["job_2"]
    assert [r.id for r in store.query(state=JobState.QUEUED)] == [
        "job_4",
        "job_3",
        "job_1",
        "job_0",
    ]
    store.client.delete(keys.job("job_3"))  # aged out: skipped, the page still fills
    assert [r.id for r in store.query(limit=2)] == ["job_4", "job_2"]
    assert store.count_by_state()["queued"] == 4


def test_waiting_jobs_without_a_message_are_found_once_per_period(store: JobStore) -> None:
    store.create(record("lost_1"))
    store.create(record("fresh_1"))
    store.client.zadd(keys.state_index("queued"), {"lost_1": 1000})  # waiting since 1970
    assert [r.id for r in store.stale_waiting(3600)] == ["lost_1"]
    assert store.stale_waiting(3600) == []  # its score moved to now


def test_work_dirs_of_dead_attempts_are_swept(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tasks.runtime import sweep_work_dirs

    store = JobStore.from_settings(Settings(redis_url=redis_url, work_dir=tmp_path))  # type: ignore[arg-type]
    store.create(record("my1-480P-mp4"))
    store.start("my1-480P-mp4", "w1/aaaaaaaaaaaa", "w1")
    (tmp_path / "my1-480P-mp4-aaaaaaaaaaaa").mkdir()  # the live attempt
    (tmp_path / "my1-480P-mp4-bbbbbbbbbbbb").mkdir()  # a SIGKILLed earlier attempt
    (tmp_path / "gone_job-cccccccccccc").mkdir()  # a job that ended elsewhere
    assert sorted(sweep_work_dirs(store)) == ["gone_job-cccccccccccc", "my1-480P-mp4-bbbbbbbbbbbb"]
    assert [p.name for p in tmp_path.iterdir()] == ["my1-480P-mp4-aaaaaaaaaaaa"]


def test_a_message_that_runs_nothing_ends_its_task_as_flower_should_show_it(
    store: JobStore,
) -> None:
    from celery.exceptions import Ignore

    from tasks.transcode import JobFailed, JobStopped, _dropped

    # a lease that cannot lapse on a loaded machine between the two starts
    store = JobStore.from_settings(store.settings.model_copy(update={"lease_ttl_s": 60}))
    dropped = {"ran": False}
    store.create(record("run_1"))
    assert store.start("run_1", "a", "w1", task_id="task-a").outcome == "started"
    busy = store.start("run_1", "b", "w2", task_id="task-a")
    assert busy.outcome == "busy"
    # the broker's redelivery of the running task's own message: no ending of its own, else
    # Flower would show that task SUCCESS and keep it so when the job fails
    with pytest.raises(Ignore):
        _dropped(store, busy, "task-a", dropped, redelivered=True)
    # another message for the running job (a repeated invocation id): SUCCESS, nothing ran
    assert _dropped(store, busy, "task-b", dropped, redelivered=False) is dropped
    error = ErrorInfo(type="MediaError", message="not a media file")
    assert store.finish("run_1", "a", JobState.FAILED, error=error)[0] == "finished"
    late = store.start("run_1", "c", "w3", task_id="task-a")
    assert late.outcome == "finished"
    # a redelivery after the end repeats the job's ending (a SUCCESS would replace FAILURE)
    with pytest.raises(JobFailed, match="MediaError: not a media file"):
        _dropped(store, late, "task-a", dropped, redelivered=True)
    assert _dropped(store, late, "task-c", dropped, redelivered=False) is dropped
    # the one message of a job stopped while queued ends FAILURE, not SUCCESS
    store.create(record("queued_2"))
    store.request_stop("queued_2")
    never = store.start("queued_2", "q", "w", task_id="task-q")
    with pytest.raises(JobStopped, match="before it started"):
        _dropped(store, never, "task-q", dropped, redelivered=False)


def test_each_ending_owes_one_delivery_in_the_same_transaction(store: JobStore) -> None:
    """The outbox entry appears with the finishing transition (failure destination: the
    default dead-letter task), once per ending, and never for a refused finish."""
    store.create(record())
    store.start("job_1", "a", "w1")
    assert store.client.zcard(keys.DELIVERIES_PENDING) == 0  # nothing owed while it runs
    assert store.finish("job_1", "b", JobState.FAILED)[0] == "lost"
    assert store.client.zcard(keys.DELIVERIES_PENDING) == 0
    _, done = store.finish("job_1", "a", JobState.FAILED, error=ErrorInfo(type="X", message="y"))
    assert done is not None and done.finished_at is not None
    owed = store.client.zrange(keys.DELIVERIES_PENDING, 0, -1)
    finished_ms = int(done.finished_at.timestamp() * 1000)
    assert owed == [keys.delivery_id("job_1", 1, "RetriesExhausted", finished_ms)]
    body = store.delivery_state(owed[0])["envelope"]
    assert '"condition": "RetriesExhausted"' in body and '"requestId": "job_1"' in body
    # a retried job that ends again owes a second, separate delivery
    store.resubmit("job_1")
    store.request_stop("job_1")
    assert store.client.zcard(keys.DELIVERIES_PENDING) == 2
