"""Where job records go when a job ends (SPEC §6): the envelope and the destination kinds.

A destination is a URI: `task:<celery task name>`, `redis-list:<key>`, `redis-stream:<key>`
or an `http(s)://` URL (POST). To add a destination kind, add a branch to `send`.

Delivery goes through an outbox (`keys.DELIVERIES_PENDING`): the job store writes the entry,
with the envelope, in the same transaction that ends the job, so a worker dying right after
cannot lose it. A sender claims a due entry for `CLAIM_WINDOW_S` (one sender at a time), sends
it to every destination not yet done, records each outcome on the job, and then removes the
entry, or, after a failure, makes it due again after a backoff. The reaper sends entries that
are due: retries, and entries whose sender died (its claim ran out). Delivery is therefore
at least once, always with the same envelope (receivers deduplicate by `requestId`); in the
normal path each completion is sent once. `redis-list` and `redis-stream` destinations are
marked done in the same transaction as the push: exactly once.
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

#: a claimed outbox entry not done within this window is sent again by a reaper (the send
#: itself is bounded by the HTTP timeout; the margin covers recording the outcome)
CLAIM_WINDOW_S = HTTP_TIMEOUT_S + 5.0

#: sends `envelope` to the Celery task `name` (the Celery app provides it)
SendTask = Callable[[str, dict[str, Any]], None]


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


def send(
    uri: str,
    body: dict[str, Any],
    *,
    store: JobStore,
    send_task: SendTask,
    done: tuple[str, str] | None = None,
) -> None:
    """Deliver one envelope to one destination URI; DeliveryError on failure.

    `done` (delivery id, destination): for Redis destinations, mark it done in the outbox in
    the same transaction as the push."""
    kind, _, target = uri.partition(":")
    try:
        if kind == "task" and target:
            send_task(target, body)
        elif kind in ("redis-list", "redis-stream") and target:
            pipe = store.client.pipeline(transaction=True)
            if kind == "redis-list":
                pipe.rpush(target, json.dumps(body))
            else:
                pipe.xadd(target, {"envelope": json.dumps(body)})
            if done is not None:
                pipe.hset(keys.delivery(done[0]), f"done:{done[1]}", "delivered")
                pipe.expire(keys.delivery(done[0]), store.settings.record_retention_s)
            pipe.execute()
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


def backoff_s(attempt: int, settings: Settings) -> float:
    """Delay before delivery attempt `attempt + 1`: exponential, capped."""
    return float(
        min(settings.retry_max_backoff_s, settings.retry_min_backoff_s * 2 ** (attempt - 1))
    )


def delivery_id_of(record: JobRecord) -> str:
    """The outbox entry of a finished record (see `JobStore._outbox_entry`)."""
    finished = record.finished_at or record.created_at
    return keys.delivery_id(
        record.id, record.attempts, condition_of(record), int(finished.timestamp() * 1000)
    )


def deliver_pending(store: JobStore, delivery_id: str, *, send_task: SendTask) -> bool:
    """Claim the outbox entry `delivery_id` and send it. False when it is not due: another
    sender holds it, or it is done."""
    token = store.claim_delivery(delivery_id, CLAIM_WINDOW_S)
    if token is None:
        return False
    send_claimed(store, delivery_id, token, send_task=send_task)
    return True


def send_claimed(store: JobStore, delivery_id: str, token: str, *, send_task: SendTask) -> None:
    """Send a claimed entry to each of its destinations not yet done; record every outcome;
    then remove the entry, or make it due again after a backoff if a destination failed."""
    job_id, _, rest = delivery_id.partition(":")
    condition = rest.split(":")[1] if rest.count(":") >= 2 else ""
    state = store.delivery_state(delivery_id)
    record = store.find(job_id)
    if record is None or "envelope" not in state:  # aged out, or done by another sender
        store.complete_delivery(delivery_id)
        return
    body = json.loads(state["envelope"])
    retry_in_s: float | None = None
    for uri in destination_uris(record, condition, store.settings):
        reference = redact(uri)
        if state.get(f"done:{reference}"):
            continue  # delivered (or given up) by an earlier send of this entry
        attempt = store.count_delivery_attempt(delivery_id, reference)
        if attempt < 0:
            return  # the entry was completed meanwhile (a sender whose claim had run out)
        status = DestinationStatus(uri=reference, condition=condition, attempts=attempt)
        try:
            send(uri, body, store=store, send_task=send_task, done=(delivery_id, reference))
        except DeliveryError as exc:
            status.last_error = str(exc)
            final = attempt >= store.settings.delivery_max_attempts
            status.status = "failed" if final else "pending"
            store.set_destination(job_id, status)
            store.log(job_id, f"delivery to {reference} failed (attempt {attempt}): {exc}")
            if final:
                store.mark_destination_done(delivery_id, reference, "failed")
                logger.error("job %s: giving up delivering %s to %s", job_id, condition, reference)
            else:
                delay_s = backoff_s(attempt, store.settings)
                retry_in_s = delay_s if retry_in_s is None else min(retry_in_s, delay_s)
            continue
        store.mark_destination_done(delivery_id, reference, "delivered")
        status.status = "delivered"
        status.delivered_at = now_utc()
        store.set_destination(job_id, status)
        store.log(job_id, f"delivered {condition} to {reference}")
    if retry_in_s is None:
        store.complete_delivery(delivery_id)
    elif not store.reschedule_delivery(delivery_id, token, retry_in_s):
        logger.warning("job %s: delivery %s was claimed by another sender", job_id, delivery_id)
