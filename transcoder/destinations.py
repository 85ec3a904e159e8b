"""Where job records go when a job ends (SPEC §6): the envelope and the destination kinds.

A destination is a URI: `task:<celery task name>`, `redis-list:<key>`, `redis-stream:<key>`
or an `http(s)://` URL (POST). Each completion is delivered once (a set-once guard key per
job, attempt and condition); a failed delivery is handed to `schedule_retry` (the Celery task
`transcoder.deliver` retries it with backoff) and every outcome is recorded on the job.
To add a destination kind, add a branch to `send`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from transcoder import keys
from transcoder.models import DestinationStatus, JobRecord, JobState
from transcoder.settings import Settings
from transcoder.store import JobStore, now_utc

logger = logging.getLogger(__name__)
# httpx logs every request URL at INFO; a destination URL may carry a token
logging.getLogger("httpx").setLevel(logging.WARNING)

#: the envelope's `functionArn`: the one task that does the work
FUNCTION_ARN = "transcoder.transcode"
HTTP_TIMEOUT_S = 10.0

#: sends `envelope` to the Celery task `name` (the Celery app provides it)
SendTask = Callable[[str, dict[str, Any]], None]
#: schedules another delivery attempt: (job_id, redacted uri, condition, envelope, attempt,
#: countdown_s); the redacted URI keeps tokens out of the broker, `resolve` finds the real one
ScheduleRetry = Callable[[str, str, str, dict[str, Any], int, float], None]


class DeliveryError(Exception):
    """One delivery attempt failed (the message is safe to record: no credentials)."""


def condition_of(record: JobRecord) -> str:
    """The envelope condition of a finished job."""
    if record.state == JobState.SUCCEEDED:
        return "Success"
    if record.state == JobState.STOPPED:
        return "Stopped"
    if record.state == JobState.EXPIRED:
        return "EventAgeExceeded"
    if record.state == JobState.INVALID:
        return "InvalidRequest"
    return "RetriesExhausted"


def envelope(record: JobRecord, condition: str | None = None) -> dict[str, Any]:
    """The SPEC §6 envelope of a finished job."""
    condition = condition or condition_of(record)
    if condition == "Success":
        function_error = ""
        payload: dict[str, Any] = {
            "bucket": record.request.get("output_bucket") or record.request.get("bucket"),
            "outputs": [output.model_dump() for output in record.outputs],
        }
    else:
        error = record.error
        function_error = "Unhandled" if error and error.type == "InternalError" else "Handled"
        payload = {
            "errorType": error.type if error else condition,
            "errorMessage": error.message if error else condition,
            "stderrTail": error.stderr_tail if error else "",
        }
    return {
        "version": "1.0",
        "timestamp": int(time.time() * 1000),
        "requestContext": {
            "requestId": record.id,
            "functionArn": FUNCTION_ARN,
            "condition": condition,
            "approximateInvokeCount": record.attempts,
        },
        "requestPayload": record.request,
        "responseContext": {"statusCode": 200, "functionError": function_error},
        "responsePayload": payload,
    }


def destination_uris(record: JobRecord, condition: str, settings: Settings) -> list[str]:
    """The job's own destination (request override) or the deployment's, for `condition`."""
    if condition == "Success":
        uri = record.request.get("on_success") or settings.on_success
    else:
        uri = record.request.get("on_failure") or settings.on_failure
    return [uri] if uri else []


def redact(uri: str) -> str:
    """The URI without user info or query string (they may hold tokens)."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def send(uri: str, body: dict[str, Any], *, store: JobStore, send_task: SendTask) -> None:
    """Deliver one envelope to one destination URI; DeliveryError on failure."""
    kind, _, target = uri.partition(":")
    try:
        if kind == "task" and target:
            send_task(target, body)
        elif kind == "redis-list" and target:
            store.client.rpush(target, json.dumps(body))
        elif kind == "redis-stream" and target:
            store.client.xadd(target, {"envelope": json.dumps(body)})
        elif kind in ("http", "https"):
            response = httpx.post(uri, json=body, timeout=HTTP_TIMEOUT_S)
            if response.status_code >= 300:
                raise DeliveryError(f"{redact(uri)} answered HTTP {response.status_code}")
        else:
            raise DeliveryError(f"unknown destination {redact(uri)!r}")
    except DeliveryError:
        raise
    except Exception as exc:  # any transport failure is a failed attempt, retried later
        raise DeliveryError(f"{redact(uri)}: {type(exc).__name__}") from None


def resolve(store: JobStore, job_id: str, reference: str, condition: str) -> str | None:
    """The real destination URI behind a redacted `reference` (None if no longer configured)."""
    record = store.find(job_id)
    if record is None:
        return None
    for uri in destination_uris(record, condition, store.settings):
        if redact(uri) == reference:
            return uri
    return None


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay before delivery attempt `attempt + 1`: exponential, capped."""
    return float(
        min(settings.retry_max_backoff_s, settings.retry_min_backoff_s * 2 ** (attempt - 1))
    )


def attempt_delivery(
    store: JobStore,
    job_id: str,
    uri: str,
    condition: str,
    body: dict[str, Any],
    attempt: int,
    *,
    send_task: SendTask,
    schedule_retry: ScheduleRetry,
) -> bool:
    """One delivery attempt; records its status and schedules the next attempt on failure."""
    status = DestinationStatus(uri=redact(uri), condition=condition, attempts=attempt)
    try:
        send(uri, body, store=store, send_task=send_task)
    except DeliveryError as exc:
        status.last_error = str(exc)
        final = attempt >= store.settings.delivery_max_attempts
        status.status = "failed" if final else "pending"
        store.set_destination(job_id, status)
        store.log(job_id, f"delivery to {redact(uri)} failed (attempt {attempt}): {exc}")
        if final:
            logger.error("job %s: giving up delivering %s to %s", job_id, condition, redact(uri))
        else:
            schedule_retry(
                job_id,
                redact(uri),
                condition,
                body,
                attempt + 1,
                backoff_s(attempt, store.settings),
            )
        return False
    status.status = "delivered"
    status.delivered_at = now_utc()
    store.set_destination(job_id, status)
    store.log(job_id, f"delivered {condition} to {redact(uri)}")
    return True


def deliver_once(
    store: JobStore,
    record: JobRecord,
    *,
    send_task: SendTask,
    schedule_retry: ScheduleRetry,
    condition: str | None = None,
) -> bool:
    """Deliver a finished job's envelope to its destinations, unless already done for this
    attempt and condition. Returns False when the guard says it was delivered before."""
    condition = condition or condition_of(record)
    finished_ms = int(record.finished_at.timestamp() * 1000) if record.finished_at else 0
    guard = keys.delivery_guard(record.id, record.attempts, condition, finished_ms)
    if not store.client.set(guard, "1", nx=True, ex=store.settings.record_retention_s):
        return False
    body = envelope(record, condition)
    for uri in destination_uris(record, condition, store.settings):
        attempt_delivery(
            store,
            record.id,
            uri,
            condition,
            body,
            1,
            send_task=send_task,
            schedule_retry=schedule_retry,
        )
    return True
