"""The Celery application, configured from the one settings object."""

from __future__ import annotations

from celery import Celery

from transcoder import keys
from transcoder.settings import Settings, get_settings


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app on the configured Redis (broker, result backend) with the service's
    delivery guarantees: late acks, requeue on worker loss, one message at a time."""
    settings = settings or get_settings()
    url = settings.redis_url.get_secret_value()
    visibility_timeout_s = settings.visibility_timeout_s
    app = Celery("transcoder", set_as_current=False)
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_connection_retry_on_startup=True,
        # a message stays in Redis until its task returns; a dead pool child requeues it
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # a job that ended failed makes its task FAILURE (for Flower): that message is done
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # redelivery of an unacked message happens only after the visibility timeout, which
        # is above the longest job; the job store's lease makes a redelivery a no-op anyway.
        # The restore sweep runs every few seconds (kombu's default is ~100 s).
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": visibility_timeout_s},
        result_expires=settings.record_retention_s,
        task_default_queue=keys.QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # events for Flower: task-sent/received/started/... plus our task-progress
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        enable_utc=True,
    )
    return app


app = make_app()
