"""What runs beside a transcode: the attempt's watcher thread, progress reports, the reaper.

- The watcher (one per attempt, in the process running the task) renews the lease every
  `heartbeat_interval_s`, polls the stop flag every 0.25 s (setting the engine's cancel
  event) and flushes buffered log lines. If the process dies, the lease lapses.
- The reaper (one thread per worker process, started when the worker is ready) finds running
  jobs whose lease lapsed and re-enqueues them, and sends the delivery outbox's due entries
  (failed deliveries whose backoff ran out, and deliveries whose sender died) on a few sender
  threads; a Redis lock lets one reaper act at a time.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from transcoder import keys
from transcoder.models import Progress
from transcoder.store import JobStore, log_stamp

logger = logging.getLogger(__name__)

STOP_POLL_S = 0.25


class AttemptWatcher(threading.Thread):
    """Heartbeat, stop-flag poll and log flushing for one running attempt."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: str,
        cancel: threading.Event,
        *,
        deadline: float | None = None,
    ) -> None:
        super().__init__(name=f"watch-{job_id}", daemon=True)
        self.store = store
        self.job_id = job_id
        self.token = token
        self.cancel = cancel
        #: `time.monotonic()` at which the attempt's wall-clock limit passes
        self.deadline = deadline
        self.stop_requested = False
        self.lease_lost = False
        self.timed_out = False
        self._done = threading.Event()
        self._lines: list[str] = []
        self._lines_lock = threading.Lock()

    def log(self, line: str) -> None:
        """Buffer a log line (ffmpeg may print many a second); flushed by the thread."""
        stamped = f"{log_stamp()} {line.rstrip()}"  # the time it happened, not of the flush
        with self._lines_lock:
            self._lines.append(stamped)

    def flush(self) -> None:
        with self._lines_lock:
            lines, self._lines = self._lines, []
        if lines:
            self.store.log(self.job_id, *lines, stamped=True)

    def run(self) -> None:
        next_beat = time.monotonic() + self.store.settings.heartbeat_interval_s
        while not self._done.wait(STOP_POLL_S):
            if self.deadline is not None and not self.timed_out:
                if time.monotonic() >= self.deadline:
                    self.timed_out = True  # the attempt ends with TimeLimitError
                    self.cancel.set()
            try:
                if not self.stop_requested and self.store.stop_requested(self.job_id):
                    self.stop_requested = True
                    self.cancel.set()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.store.settings.heartbeat_interval_s
                    if not self.store.renew_lease(self.job_id, self.token):
                        # another attempt owns the job now: ours must end without a trace
                        self.lease_lost = True
                        self.cancel.set()
                self.flush()
            except Exception:  # Redis hiccup: keep watching; the lease TTL covers short gaps
                logger.warning("job %s: watcher could not reach Redis", self.job_id, exc_info=True)

    def close(self) -> None:
        self._done.set()
        self.join(5)
        try:
            self.flush()
        except Exception:
            logger.warning("job %s: could not flush its log", self.job_id, exc_info=True)


class ProgressReporter:
    """At most one report per `progress_interval_s`: into the record, as a `task-progress`
    Celery event (Flower shows PROGRESS) and as the task's PROGRESS result state."""

    #: share of the overall percentage each phase covers
    SPANS = {"download": (0.0, 5.0), "transcode": (5.0, 95.0), "upload": (95.0, 100.0)}

    def __init__(
        self, app: Celery, store: JobStore, job_id: str, token: str, task_id: str, hostname: str
    ) -> None:
        self.app, self.store, self.job_id, self.token = app, store, job_id, token
        self.task_id, self.hostname = task_id, hostname
        self.interval_s = store.settings.progress_interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    def report(
        self, phase: str, phase_percent: float, *, force: bool = False, **rates: float | None
    ) -> None:
        """Report `phase_percent` (0-100) of `phase` with optional fps, speed and eta_s."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.interval_s:
                return
            self._last = now
        low, high = self.SPANS[phase]
        percent = round(low + (high - low) * max(0.0, min(100.0, phase_percent)) / 100, 2)
        progress = Progress(percent=percent, phase=phase, **rates)  # type: ignore[arg-type]
        fields: dict[str, Any] = {"job_id": self.job_id, **progress.model_dump()}
        # Celery merges event fields into the task; Flower's task page shows `result`
        fields["result"] = f"{percent:.1f}% {phase}" + (
            f" ({rates['speed']:.2f}x)" if rates.get("speed") else ""
        )
        try:
            self.store.update_running(self.job_id, self.token, progress=progress)
            with self.app.events.default_dispatcher(hostname=self.hostname) as dispatcher:
                dispatcher.send("task-progress", uuid=self.task_id, **fields)
            self.app.backend.store_result(self.task_id, fields, "PROGRESS")
        except Exception:  # progress is informative; never fail a job for it
            logger.warning("job %s: progress report failed", self.job_id, exc_info=True)


# --- the reaper --------------------------------------------------------------------------


def sweep_work_dirs(store: JobStore) -> list[str]:
    """Remove this machine's attempt dirs (`{job_id}-{token suffix}`) whose attempt no longer
    owns its job: a SIGKILLed worker cannot clean up after itself."""
    root = Path(store.settings.work_dir)
    if not root.is_dir():
        return []
    removed = []
    for entry in root.iterdir():
        job_id, dash, suffix = entry.name.rpartition("-")
        if not dash or not job_id or not entry.is_dir():
            continue
        run = store.client.hget(keys.job_meta(job_id), "run")
        if isinstance(run, str) and run.endswith(f"/{suffix}"):
            continue  # a live attempt (ours or a sibling worker's)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


_reaper_stop = threading.Event()

#: outbox entries sent at once by this process's reaper (each send is bounded by its timeout)
SENDERS = 4
_senders: ThreadPoolExecutor | None = None
_in_flight = threading.BoundedSemaphore(SENDERS)


def send_due_deliveries(store: JobStore, app: Celery) -> list[str]:
    """Claim due outbox entries (as many as there are idle sender threads) and send them in
    the background: a slow destination never holds up the reaping of jobs."""
    from tasks.delivery import delivery_hooks
    from transcoder.destinations import CLAIM_WINDOW_S, send_claimed

    global _senders
    if _senders is None:
        _senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="deliver")
    send_task = delivery_hooks(app)
    claimed = []
    for delivery_id in store.due_deliveries(SENDERS):
        if not _in_flight.acquire(blocking=False):
            break
        token = store.claim_delivery(delivery_id, CLAIM_WINDOW_S)
        if token is None:
            _in_flight.release()
            continue
        claimed.append(delivery_id)

        def run(delivery_id: str = delivery_id, token: str = token) -> None:
            try:
                send_claimed(store, delivery_id, token, send_task=send_task)
            except Exception:  # the claim runs out and a later sweep sends it again
                logger.warning("delivery %s failed", delivery_id, exc_info=True)
            finally:
                _in_flight.release()

        _senders.submit(run)
    return claimed


def reap_once(store: JobStore, app: Celery) -> list[str]:
    """One sweep (if this process holds the lock): returns the ids it acted on."""
    from transcoder import service

    interval_ms = int(store.settings.reaper_interval_s * 1000)
    if not store.client.set(keys.REAPER_LOCK, uuid.uuid4().hex, nx=True, px=max(interval_ms, 500)):
        return []
    acted = []
    for job_id in store.abandoned():
        outcome = store.reap(job_id)
        if outcome.record is None or outcome.outcome == "busy":
            continue
        acted.append(job_id)
        if outcome.outcome == "requeue":
            store.log(job_id, f"worker lost; re-enqueued (attempt {outcome.record.attempts})")
            logger.warning("job %s: lease expired; re-enqueued", job_id)
            service.enqueue(job_id, outcome.record.request, settings=store.settings)
        else:
            store.log(job_id, f"worker lost; job ended {outcome.record.state.value}")
            _remove_temporary_objects(store, outcome.record.id, outcome.record.request)
            service.finished(store, outcome.record, settings=store.settings)
    # by now the broker would have delivered or restored any message of these jobs; a
    # duplicate message is harmless (the job store lets one attempt start)
    settings = store.settings
    for record in store.stale_waiting(settings.visibility_timeout_s + settings.retry_max_backoff_s):
        acted.append(record.id)
        store.log(record.id, "no message for this waiting job; re-enqueued")
        service.enqueue(record.id, record.request, settings=settings)
    send_due_deliveries(store, app)
    return acted


def _remove_temporary_objects(store: JobStore, job_id: str, request: dict[str, Any]) -> None:
    """A job ended because its worker died (no attempt follows): the dead attempt's
    temporary upload objects go (best effort; a bucket lifecycle rule is the backstop)."""
    from tasks.transcode import Uploads
    from transcoder.models import JobRequest
    from transcoder.storage import Storage

    try:
        uploads = Uploads(JobRequest.model_validate(request), job_id, attempt="")
        Storage(store.settings).remove_prefix(uploads.request.target_bucket, uploads.job_temp_root)
    except Exception as exc:
        store.log(job_id, f"could not remove the dead attempt's temporary objects: {exc}")


def _reaper_loop(app: Celery) -> None:
    from transcoder.service import get_store

    store = get_store()
    while True:
        try:
            sweep_work_dirs(store)
            reap_once(store, app)
        except Exception:
            logger.warning("reaper sweep failed", exc_info=True)
        if _reaper_stop.wait(store.settings.reaper_interval_s):
            return


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    from tasks.app import app

    _reaper_stop.clear()
    threading.Thread(target=_reaper_loop, args=(app,), name="reaper", daemon=True).start()
    logger.info("reaper started")


@worker_shutdown.connect
def _stop_reaper(sender: Any = None, **_: Any) -> None:
    _reaper_stop.set()
