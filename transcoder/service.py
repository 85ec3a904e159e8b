"""The job service's library calls: what the CLI and the HTTP API do, in one place.

Submitting creates the record (atomic invocation-id dedup) and then enqueues the Celery task
`transcoder.transcode` with the job id; the worker does the rest (`tasks/`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from transcoder import keys
from transcoder.errors import RequestError
from transcoder.models import JobEvent, JobRecord, JobRequest, JobState
from transcoder.settings import Settings, get_settings
from transcoder.store import JobStore, now_utc

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

TASK_NAME = "transcoder.transcode"
_stores: dict[tuple[str, str], JobStore] = {}
_apps: dict[str, Celery] = {}


@dataclass
class SubmitResult:
    record: JobRecord
    created: bool  # False: the invocation id already existed (dedup hit)


def format_validation_error(exc: ValidationError) -> str:
    """One readable line per problem: `field: message` (unknown fields named as such)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())) or "request"
        if error.get("type") == "extra_forbidden":
            problems.append(f"unknown field {where!r}")
        else:
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
    return "invalid job request: " + "; ".join(problems)


def parse_request(data: JobRequest | dict[str, Any] | Any) -> JobRequest:
    """Validate a request (model or plain dict); RequestError with a readable message."""
    if isinstance(data, JobRequest):
        return data
    if not isinstance(data, dict):
        raise RequestError("invalid job request: it must be a JSON object")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestError(format_validation_error(exc)) from None


def request_payload(request: JobRequest) -> dict[str, Any]:
    """The request as the record and envelopes carry it (JSON types, unset fields left out)."""
    return request.model_dump(mode="json", exclude_none=True)


def get_store(settings: Settings | None = None) -> JobStore:
    """A cached JobStore for these settings."""
    settings = settings or get_settings()
    cache_key = (settings.redis_url.get_secret_value(), settings.model_dump_json())
    if cache_key not in _stores:
        _stores[cache_key] = JobStore.from_settings(settings)
    return _stores[cache_key]


def celery_app(settings: Settings | None = None) -> Celery:
    """The Celery app for these settings (the worker's own app for the default settings)."""
    from tasks.app import app, make_app

    if settings is None or settings is get_settings():
        return app
    url = settings.redis_url.get_secret_value()
    if url not in _apps:
        _apps[url] = make_app(settings)
    return _apps[url]


def enqueue(
    job_id: str,
    request: dict[str, Any],
    *,
    countdown_s: float | None = None,
    settings: Settings | None = None,
) -> None:
    """Send one transcode message for an existing job record."""
    formats = request.get("dst_formats") or request.get("dst_format")
    summary = f"{request.get('bucket')}/{request.get('object')} -> {formats}"
    send(
        celery_app(settings),
        TASK_NAME,
        kwargs={"request": request, "job_id": job_id},
        countdown=countdown_s,
        kwargsrepr=f"job {job_id}: {summary}",
    )


def send(celery: Celery, name: str, **options: Any) -> None:
    """Publish a task message straight into the service queue.

    The anonymous exchange with the queue name as routing key does not depend on kombu's
    binding keys in Redis, so a message is never dropped when those are gone (a Redis
    restarted empty, a flushed test database) while this process thinks they exist."""
    celery.send_task(name, exchange="", routing_key=keys.QUEUE, **options)


def new_record(job_id: str, request: dict[str, Any], **fields: Any) -> JobRecord:
    """A fresh record for a submission."""
    fields.setdefault("invocation_id", request.get("invocation_id"))
    created_at = now_utc()
    events = [JobEvent(at=created_at, event=str(fields.get("state", JobState.QUEUED)))]
    return JobRecord(id=job_id, request=request, created_at=created_at, events=events, **fields)


def submit(
    request: JobRequest | dict[str, Any], *, settings: Settings | None = None
) -> SubmitResult:
    """Validate, create (or find, by invocation id) the job and enqueue it once."""
    parsed = parse_request(request)
    payload = request_payload(parsed)
    job_id = parsed.invocation_id or uuid.uuid4().hex
    record, created = get_store(settings).create(new_record(job_id, payload))
    if created:
        get_store(settings).log(job_id, f"submitted: {payload.get('object')}")
        enqueue(job_id, payload, settings=settings)
    return SubmitResult(record=record, created=created)


def get_job(job_id: str, *, settings: Settings | None = None) -> JobRecord:
    """The job's record; JobNotFoundError if unknown."""
    return get_store(settings).get(job_id)


def _state(state: JobState | str | None) -> JobState | None:
    if state is None or isinstance(state, JobState):
        return state
    try:
        return JobState(state.lower())
    except ValueError:
        choices = ", ".join(s.value for s in JobState)
        raise RequestError(f"unknown state {state!r}: choose from {choices}") from None


def list_jobs(
    *,
    state: JobState | str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
    settings: Settings | None = None,
) -> list[JobRecord]:
    """Jobs newest first, from the indexes (by state-entry time when `state` is given)."""
    if limit < 1 or offset < 0:
        raise RequestError("limit must be >= 1 and offset >= 0")
    return get_store(settings).query(
        state=_state(state), since=since, until=until, limit=limit, offset=offset
    )


def job_logs(job_id: str, *, settings: Settings | None = None) -> list[str]:
    """The job's bounded log, oldest line first."""
    store = get_store(settings)
    store.get(job_id)  # JobNotFoundError for an unknown job
    return store.log_lines(job_id)


def stop_job(job_id: str, *, settings: Settings | None = None) -> JobRecord:
    """Stop a job: a queued one never starts; a running one is cancelled by its worker."""
    store = get_store(settings)
    record, finished_now = store.request_stop(job_id)
    store.log(job_id, "stop requested")
    if finished_now:
        finished(store, record, settings=settings)
    return record


def retry_job(job_id: str, *, settings: Settings | None = None) -> JobRecord:
    """Run a failed, stopped or expired job again with the same request."""
    store = get_store(settings)
    record = store.resubmit(job_id)
    store.log(job_id, "retry requested")
    enqueue(job_id, record.request, settings=settings)
    return record


def stats(*, settings: Settings | None = None) -> dict[str, Any]:
    """Jobs per state, the broker queue depth and the running jobs."""
    store = get_store(settings)
    running = store.query(state=JobState.RUNNING, limit=1000) + store.query(
        state=JobState.STOPPING, limit=1000
    )
    return {
        "jobs_by_state": store.count_by_state(),
        "queue_depth": int(store.client.llen(keys.QUEUE)),  # type: ignore[arg-type]
        "running": running,
    }


def finished(
    store: JobStore, record: JobRecord, *, bytes_in: int = 0, settings: Settings | None = None
) -> None:
    """Everything owed to a job that just ended: its destinations and the metrics."""
    from tasks.delivery import delivery_hooks
    from transcoder.destinations import deliver_pending, delivery_id_of

    # the job store put the delivery in its outbox when the job ended; send it now (a reaper
    # re-sends it if this process dies first, or when a destination failed)
    try:
        deliver_pending(
            store, delivery_id_of(record), send_task=delivery_hooks(celery_app(settings))
        )
    except Exception:  # a broken destination must not lose the job's end state
        logger.exception("job %s: delivering its record failed", record.id)
    try:
        from transcoder.metrics import record_job_finished

        duration_s = 0.0
        if record.started_at and record.finished_at:
            duration_s = (record.finished_at - record.started_at).total_seconds()
        record_job_finished(
            store.client,
            state=record.state.value,
            duration_s=duration_s,
            bytes_in=bytes_in,
            bytes_out=sum(output.size for output in record.outputs),
        )
    except Exception:  # metrics are best effort
        logger.warning("job %s: recording metrics failed", record.id, exc_info=True)
