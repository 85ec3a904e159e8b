"""Destination tasks: `transcoder.deliver` (a retried delivery) and `transcoder.dest_fail`
(the default failure destination: an alert in the log and the dead-letter list)."""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery

from tasks.app import app
from transcoder import keys
from transcoder.destinations import ScheduleRetry, SendTask, attempt_delivery, resolve
from transcoder.service import get_store, send

logger = logging.getLogger(__name__)


def delivery_hooks(celery: Celery) -> tuple[SendTask, ScheduleRetry]:
    """How destinations reach Celery: send an envelope to a task; schedule a retry."""

    def send_task(name: str, body: dict[str, Any]) -> None:
        send(celery, name, args=[body])

    def schedule_retry(
        job_id: str,
        reference: str,
        condition: str,
        body: dict[str, Any],
        attempt: int,
        countdown_s: float,
    ) -> None:
        send(
            celery,
            "transcoder.deliver",
            args=[job_id, reference, condition, body, attempt],
            countdown=countdown_s,
        )

    return send_task, schedule_retry


@app.task(name="transcoder.deliver", acks_late=True)
def deliver(
    job_id: str, reference: str, condition: str, body: dict[str, Any], attempt: int
) -> bool:
    """Another attempt to deliver a job's envelope to one destination (`reference`: its
    redacted URI; the real one is looked up again so no token travels through the broker)."""
    store = get_store()
    uri = resolve(store, job_id, reference, condition)
    if uri is None:
        store.log(job_id, f"delivery to {reference} dropped: no longer configured")
        return False
    send_task, schedule_retry = delivery_hooks(app)
    return attempt_delivery(
        store,
        job_id,
        uri,
        condition,
        body,
        attempt,
        send_task=send_task,
        schedule_retry=schedule_retry,
    )


@app.task(name="transcoder.dest_fail", acks_late=True)
def dest_fail(body: dict[str, Any]) -> None:
    """The default failure destination: log an alert and push the envelope to the DLQ once."""
    context = body.get("requestContext", {})
    payload = body.get("responsePayload", {})
    job_id = str(context.get("requestId", "?"))
    condition = str(context.get("condition", "?"))
    logger.error(
        "ALERT job %s ended with %s after %s attempt(s): %s: %s",
        job_id,
        condition,
        context.get("approximateInvokeCount"),
        payload.get("errorType"),
        payload.get("errorMessage"),
    )
    store = get_store()
    # a redelivered dest_fail message must not push a second copy
    attempts = int(context.get("approximateInvokeCount") or 0)
    guard = keys.dlq_guard(job_id, attempts, condition, int(body.get("timestamp") or 0))
    if store.client.set(guard, "1", nx=True, ex=store.settings.record_retention_s):
        store.client.rpush(keys.DLQ, json.dumps(body))
