"""Destination tasks: `transcoder.dest_fail` (the default failure destination: an alert in the
log and the dead-letter list). Deliveries themselves go through the job store's outbox
(`transcoder.destinations`): no delivery travels as a (countdown) broker message."""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery

from tasks.app import app
from transcoder import keys
from transcoder.destinations import SendTask
from transcoder.service import get_store, send

logger = logging.getLogger(__name__)


def delivery_hooks(celery: Celery) -> SendTask:
    """How a `task:` destination reaches Celery: send the envelope to that task."""

    def send_task(name: str, body: dict[str, Any]) -> None:
        send(celery, name, args=[body])

    return send_task


@app.task(name="transcoder.deliver", acks_late=True)
def deliver(*args: Any) -> bool:
    """Obsolete: retries used to be countdown messages of this task. A message left from an
    older version is dropped; the outbox re-sends what is still owed."""
    logger.info("obsolete transcoder.deliver message dropped (the outbox delivers)")
    return False


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
