"""The task `transcoder.transcode`: one attempt of one job, accounted for exactly once.

Every delivered message first asks the job store whether it may start (a finished job, or one
whose lease is alive elsewhere, is acknowledged and dropped). The attempt then downloads the
source into its own work dir, runs the engine once for every format, uploads the outputs under
its own temporary prefix (`{output_dir}/.transcoder-tmp/{job}/{attempt}/`), copies them into
place server-side (HLS segments before the playlist), deletes the temporary objects and
finishes the job with an atomic transition. A stop or failure removes only what this attempt
wrote: its temporary objects, and the final keys it already copied whose metadata still names
this attempt; never an object another job wrote under the same keys. The work dir always goes,
and the whole attempt (download, transcode, upload) is bounded by `job_time_limit_s`.

The Celery task's own end state tells Flower how the job ended: SUCCESS for a job that
succeeded, FAILURE for a job that ended failed, expired, invalid or stopped (`JobFailed`,
`JobStopped`, raised only after the record and its destinations are settled), RETRY for an
attempt whose job will run again. A duplicate message ends SUCCESS without running anything;
a redelivered copy of a message whose task is still running is ignored (`_dropped`).
"""

from __future__ import annotations

import logging
import random
import re
import shlex
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry

from tasks.app import app
from tasks.runtime import AttemptWatcher, ProgressReporter
from transcoder import service
from transcoder.errors import (
    CancelledError,
    InsufficientDiskError,
    InternalError,
    RequestError,
    TimeLimitError,
    TranscoderError,
)
from transcoder.models import JobRecord, JobRequest, JobState, OutputObject
from transcoder.storage import UPLOAD_TEMP_DIR, Storage
from transcoder.store import JobStore, StartOutcome, error_info, new_token

logger = logging.getLogger(__name__)


#: the invocation id rule of SPEC §3 (ids go into Redis keys)
_JOB_ID_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")


class AttemptLost(Exception):
    """Our attempt no longer owns the job (the reaper gave it to another worker)."""


class JobFailed(Exception):
    """The job ended failed, expired or invalid: the Celery task ends FAILURE, so Flower tells
    it from a success. Raised only after the job's record and destinations are settled; it is
    in the task's `throws` (one INFO line in the worker log, no traceback), its message is
    acknowledged (`task_acks_on_failure_or_timeout`) and nothing retries it."""


class JobStopped(JobFailed):
    """The job was stopped. FAILURE rather than REVOKED: Celery ranks REVOKED below a custom
    state, so a REVOKED event after the task's PROGRESS events would leave Flower at PROGRESS."""


TEMP_DIR = UPLOAD_TEMP_DIR


@dataclass
class Uploads:
    """Where one attempt writes: its temporary prefix, and the final keys it copied to."""

    request: JobRequest
    job_id: str
    attempt: str  # the attempt token's unique suffix (also in each object's metadata)
    started: bool = False
    placed: list[str] = field(default_factory=list)

    @property
    def job_temp_root(self) -> str:
        """Every attempt's temporary prefix of this job lies under this one."""
        return self.request.output_key(f"{TEMP_DIR}/{self.job_id}/")

    @property
    def temp_prefix(self) -> str:
        return f"{self.job_temp_root}{self.attempt}/"

    def temp_key(self, name: str) -> str:
        # `.part`: no trigger rule's suffix filter (`.mp4`, ...) matches a temporary object
        return f"{self.temp_prefix}{name}.part"


#: job states that end the Celery task FAILURE (besides "stopped")
_FAILED_STATES = {"failed", "expired", "invalid"}


def _end_task(store: JobStore, job_id: str, state: str, result: dict[str, Any]) -> dict[str, Any]:
    """Return `result` (SUCCESS) or raise what makes Flower show how the job ended."""
    if state == "stopped":
        raise JobStopped(f"job {job_id} stopped")
    if state not in _FAILED_STATES and state != "retrying":
        return result
    record = store.find(job_id)
    error = record.error if record is not None else None
    reason = f"{error.type}: {error.message}" if error is not None else state
    if state == "retrying":
        # the job's next attempt is a new message (sent by `_failed`); this one only says so
        message = f"job {job_id}: attempt failed ({reason}); it will run again"
        raise Retry(message, exc=JobFailed(message))
    raise JobFailed(f"job {job_id} {state}: {reason}")


def _resolve(store: JobStore, request: Any, job_id: str | None, task_id: str) -> str | None:
    """The job this message is about, creating the record for a plain `transcode.delay(...)`.

    Returns None for a message whose job record is gone; raises JobFailed for an invalid
    request once it is recorded and delivered."""
    if job_id:
        return job_id if store.find(job_id) is not None else None
    try:
        parsed = service.parse_request(request)
    except RequestError as exc:
        raw = request if isinstance(request, dict) else {"raw": repr(request)[:1000]}
        claimed = raw.get("invocation_id")
        invalid_id = claimed if _valid_id(claimed) else task_id
        record = service.new_record(
            str(invalid_id),
            raw,
            state=JobState.INVALID,
            invocation_id=claimed if _valid_id(claimed) else None,
        )
        record.error = error_info(exc)
        record.finished_at = record.created_at
        record, created = store.create(record)
        if not created:
            return record.id  # a duplicate of an invalid request: the job store drops it
        store.log(record.id, str(exc))
        service.finished(store, record)
        raise JobFailed(f"job {record.id} invalid: {exc}") from None
    payload = service.request_payload(parsed)
    record, created = store.create(service.new_record(parsed.invocation_id or task_id, payload))
    if created:
        store.log(record.id, f"submitted through Celery: {parsed.object}")
    return record.id


def _dropped(
    store: JobStore,
    start: StartOutcome,
    task_id: str,
    result: dict[str, Any],
    *,
    redelivered: bool,
) -> dict[str, Any]:
    """How a message that runs nothing ends its Celery task (the job is left as it is).

    A redelivered message has the task id of the message it repeats, and Flower keeps one
    state per task id, where a later SUCCESS overrides a FAILURE (and a FAILURE after a
    SUCCESS is ignored). So a redelivery whose own task is still running ends with Ignore
    (no event: the running attempt's ending is the one that counts) and a redelivery for a
    finished job repeats that job's ending. Any other duplicate (a repeated invocation id)
    ends SUCCESS, except the only message of a job stopped while it was queued."""
    record = start.record
    if record is None:
        return result
    if redelivered:
        if start.outcome == "busy" and store.meta(record.id).get("task") == task_id:
            raise Ignore
        if start.outcome == "finished" and record.state == JobState.STOPPED:
            raise JobStopped(f"job {record.id} stopped (a redelivered message; nothing ran)")
        if start.outcome == "finished" and record.state.value in _FAILED_STATES:
            reason = f": {record.error.type}: {record.error.message}" if record.error else ""
            raise JobFailed(
                f"job {record.id} {record.state.value}{reason} (a redelivered message; nothing ran)"
            )
        return result
    if start.outcome == "finished" and record.state == JobState.STOPPED and not record.started_at:
        raise JobStopped(f"job {record.id} stopped before it started")
    return result


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID_RE.fullmatch(value) is not None


@app.task(
    bind=True,
    name="transcoder.transcode",
    acks_late=True,
    acks_on_failure_or_timeout=True,
    max_retries=None,
    throws=(JobFailed,),
)
def transcode(self: Task, request: Any = None, job_id: str | None = None) -> dict[str, Any]:
    """Run one attempt of a job (`request` as a dict; `job_id` when the service made it).

    Returns for a success or a dropped message; raises JobFailed / JobStopped / Retry (after
    the record and destinations are settled) when the job ended otherwise."""
    if isinstance(request, JobRequest):
        request = service.request_payload(request)
    store = service.get_store()
    task_id = str(self.request.id)
    resolved = _resolve(store, request, job_id, task_id)
    if resolved is None:
        return {"job_id": job_id, "ran": False}
    worker = str(self.request.hostname or socket.gethostname())
    token = new_token(worker)
    start = store.start(resolved, token, worker, task_id=task_id)
    if start.outcome != "started" or start.record is None:
        dropped = {"job_id": resolved, "ran": False, "outcome": start.outcome}
        if start.outcome in ("stopped", "expired", "exhausted") and start.record is not None:
            # this message ended the job (an atomic transition: a duplicate sees "finished")
            store.log(resolved, f"ended before running: {start.record.state.value}")
            service.finished(store, start.record)
            return _end_task(store, resolved, start.record.state.value, dropped)
        logger.info("job %s: message dropped (%s)", resolved, start.outcome)
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        return _dropped(store, start, task_id, dropped, redelivered=redelivered)
    store.log(resolved, f"attempt {start.record.attempts} started on {worker}")
    state = _run_attempt(store, start.record, token, task_id, worker)
    if state == "lost" and store.meta(resolved).get("task") == task_id:
        raise Ignore  # a redelivery of this very message took the job over: its ending counts
    return _end_task(store, resolved, state, {"job_id": resolved, "ran": True, "state": state})


def _run_attempt(store: JobStore, record: JobRecord, token: str, task_id: str, worker: str) -> str:
    job_id = record.id
    request = JobRequest.model_validate(record.request)
    settings = store.settings
    cancel = threading.Event()
    # the wall-clock limit bounds the whole attempt: the watcher cancels it when it passes
    deadline = time.monotonic() + settings.job_time_limit_s
    watcher = AttemptWatcher(store, job_id, token, cancel, deadline=deadline)
    reporter = ProgressReporter(app, store, job_id, token, task_id, worker)
    attempt_id = token.rsplit("/", 1)[-1]
    work_dir = Path(settings.work_dir) / f"{job_id}-{attempt_id}"
    storage = Storage(settings)
    uploads = Uploads(request, job_id, attempt_id)
    source_bytes = 0
    # an earlier attempt of this job on this machine died (we own the job now): its files go
    # (exact match: the glob also finds other jobs whose id starts with "{job_id}-")
    for stale in Path(settings.work_dir).glob(f"{job_id}-*"):
        if stale.name.rpartition("-")[0] == job_id:
            shutil.rmtree(stale, ignore_errors=True)
    watcher.start()
    try:
        try:
            source_bytes, outputs = _work(
                request, storage, store, job_id, work_dir, cancel, watcher, reporter, uploads
            )
            if watcher.lease_lost:
                raise AttemptLost
            # the work dir goes before the job reads as done: a finished job leaves no files
            shutil.rmtree(work_dir, ignore_errors=True)
            watcher.flush()
            outcome, final = store.finish(job_id, token, JobState.SUCCEEDED, outputs=outputs)
            if outcome == "stop_requested":
                raise CancelledError("stopped before the job could be recorded as done")
            if outcome == "lost":
                raise AttemptLost
        except AttemptLost:
            store.log(job_id, f"attempt on {worker} lost its lease; another attempt owns the job")
            return "lost"
        except Exception as exc:
            shutil.rmtree(work_dir, ignore_errors=True)
            watcher.flush()
            return _failed(
                store, job_id, token, request, storage, uploads, exc, watcher, source_bytes
            )
        assert final is not None
        store.log(job_id, f"succeeded: {len(outputs)} object(s) in s3://{request.target_bucket}")
        service.finished(store, final, bytes_in=source_bytes)
        return final.state.value
    finally:
        watcher.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def _work(
    request: JobRequest,
    storage: Storage,
    store: JobStore,
    job_id: str,
    work_dir: Path,
    cancel: threading.Event,
    watcher: AttemptWatcher,
    reporter: ProgressReporter,
    uploads: Uploads,
) -> tuple[int, list[OutputObject]]:
    """Download, transcode, upload (temporary keys, then copied into place); returns
    (source bytes, outputs)."""
    from transcoder import engine

    settings = store.settings
    info = storage.stat(request.bucket, request.object)
    work_dir.mkdir(parents=True, exist_ok=True)
    # room for the source and outputs about its size, plus the configured reserve
    needed = 2 * info.size + settings.min_free_disk_bytes
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise InsufficientDiskError(
            f"work dir has {free} bytes free; this job needs about {needed}"
        )
    suffix = Path(request.object).suffix.lower()
    source = work_dir / f"source{suffix if suffix.isascii() and len(suffix) <= 10 else ''}"
    watcher.log(f"download s3://{request.bucket}/{request.object} ({info.size} bytes)")
    reporter.report("download", 0, force=True)
    storage.download(
        request.bucket,
        request.object,
        source,
        cancel=cancel,
        on_bytes=lambda done, total: reporter.report("download", 100 * done / max(total, 1)),
    )
    out_dir = work_dir / "out"
    out_dir.mkdir()
    started = time.monotonic()

    def on_command(command: list[str]) -> None:
        # into the record before ffmpeg starts: a failed or stopped job shows it too
        watcher.log(f"ffmpeg command: {shlex.join(command)}")
        try:
            store.update_running(job_id, watcher.token, commands=[command])
        except Exception:  # a Redis hiccup must not fail the job; the log line has it
            logger.warning("job %s: could not record its command", job_id, exc_info=True)

    remaining_s = (watcher.deadline or float("inf")) - time.monotonic()
    if remaining_s <= 0:
        raise TimeLimitError("the time limit passed before transcoding began")
    result = engine.transcode(
        source,
        out_dir,
        stem=request.stem,
        formats=request.formats,
        options=request.encoding_options(),
        settings=settings,
        on_progress=lambda event: reporter.report(
            "transcode", event.percent, fps=event.fps, speed=event.speed, eta_s=event.eta_s
        ),
        on_log=watcher.log,
        on_command=on_command,
        cancel=cancel,
        time_limit_s=remaining_s if watcher.deadline is not None else None,
    )
    watcher.log(f"transcoded in {time.monotonic() - started:.1f} s")
    paths = [path for output in result.outputs for path in output.paths]  # playlists last
    outputs: list[OutputObject] = []
    total_bytes = max(1, sum(path.stat().st_size for path in paths))
    sent_bytes = 0

    def on_bytes(done: int, _total: int) -> None:
        reporter.report("upload", 100 * (sent_bytes + done) / total_bytes)

    reporter.report("upload", 0, force=True)
    bucket = request.target_bucket
    uploads.started = True
    try:  # temporary objects of this job's dead attempts (this attempt owns the job now)
        storage.remove_prefix(bucket, uploads.job_temp_root)
    except TranscoderError as exc:
        watcher.log(f"could not remove earlier attempts' temporary objects: {exc}")
    sizes: dict[str, int] = {}
    for path in paths:
        if cancel.is_set():
            raise CancelledError("stopped during upload")
        found = storage.upload(
            bucket,
            uploads.temp_key(path.name),
            path,
            job_id=job_id,
            attempt=uploads.attempt,
            content_key=path.name,
            cancel=cancel,  # a stop takes effect between the parts of a large file
            on_bytes=on_bytes,
        )
        sent_bytes += found.size
        sizes[path.name] = found.size
    # into place: server-side copies, HLS segments before the playlist
    for path in paths:
        if cancel.is_set():
            raise CancelledError("stopped during upload")
        key = request.output_key(path.name)
        uploads.placed.append(key)  # before the call: on failure it goes, if still ours
        storage.copy(
            bucket, uploads.temp_key(path.name), key, job_id=job_id, attempt=uploads.attempt
        )
        outputs.append(OutputObject(key=key, size=sizes[path.name]))
    try:
        storage.remove_many(bucket, [uploads.temp_key(path.name) for path in paths])
    except TranscoderError as exc:  # the outputs are in place; a later attempt's sweep or a
        # bucket lifecycle rule on `.transcoder-tmp/` removes the rest
        watcher.log(f"could not remove the temporary objects: {exc}")
    reporter.report("upload", 100, force=True)
    if cancel.is_set():
        raise CancelledError("stopped during upload")
    return info.size, outputs


def _failed(
    store: JobStore,
    job_id: str,
    token: str,
    request: JobRequest,
    storage: Storage,
    uploads: Uploads,
    exc: Exception,
    watcher: AttemptWatcher,
    source_bytes: int,
) -> str:
    """End a failed attempt: remove what it wrote, then stop, retry later or fail the job."""
    if watcher.lease_lost:
        # the attempt now owning the job writes the final keys: only our temporary ones go
        _remove_own(store, storage, uploads, placed=False)
        store.log(job_id, "attempt lost its lease; another attempt owns the job")
        return "lost"
    _remove_own(store, storage, uploads, placed=True)
    if isinstance(exc, TranscoderError):
        error = exc
    else:
        logger.exception("job %s: unexpected error", job_id)
        error = InternalError(f"internal error ({type(exc).__name__}); see the worker log")
    stop_requested = watcher.stop_requested or store.stop_requested(job_id)
    if isinstance(error, CancelledError) and stop_requested:
        state = JobState.STOPPED
    elif watcher.timed_out or isinstance(error, TimeLimitError):
        limit_s = store.settings.job_time_limit_s
        error = TimeLimitError(
            f"the job ran longer than its wall-clock limit of {limit_s:g} s "
            "(TRANSCODER_JOB_TIME_LIMIT_S)",
            stderr_tail=error.stderr_tail,
        )
        state = JobState.FAILED
    elif isinstance(error, RequestError):
        state = JobState.INVALID
    elif error.retryable and store.can_retry(job_id):
        record = store.retry_later(job_id, token, error_info(error))
        if record is None:
            return "lost"
        delay_s = _backoff_s(record.attempts, store)
        store.log(job_id, f"{error.error_type}: {error.message}; retry in {delay_s:.1f} s")
        service.enqueue(job_id, record.request, countdown_s=delay_s, settings=store.settings)
        return JobState.RETRYING.value
    else:
        state = JobState.FAILED
    outcome, final = store.finish(job_id, token, state, error=error_info(error), outputs=[])
    if outcome != "finished" or final is None:
        return "lost"
    store.log(job_id, f"{state.value}: {error.error_type}: {error.message}")
    if error.stderr_tail:
        store.log(job_id, "ffmpeg stderr (tail):", *error.stderr_tail.splitlines()[-20:])
    service.finished(store, final, bytes_in=source_bytes)
    return final.state.value


def _remove_own(store: JobStore, storage: Storage, uploads: Uploads, *, placed: bool) -> None:
    """Remove this attempt's temporary objects and (with `placed`) the final keys it copied
    whose metadata still names this attempt: never what another job (or attempt) wrote."""
    if not uploads.started:
        return
    bucket, job_id = uploads.request.target_bucket, uploads.job_id
    try:
        storage.remove_prefix(bucket, uploads.temp_prefix)
        ours = [
            key
            for key in (uploads.placed if placed else [])
            if storage.written_by(bucket, key) == (job_id, uploads.attempt)
        ]
        storage.remove_many(bucket, ours)
    except TranscoderError as cleanup:
        store.log(job_id, f"could not remove this attempt's objects: {cleanup}")


def _backoff_s(attempt: int, store: JobStore) -> float:
    """Exponential backoff with full jitter, between the configured bounds."""
    settings = store.settings
    ceiling = min(settings.retry_max_backoff_s, settings.retry_min_backoff_s * 2 ** (attempt - 1))
    return random.uniform(settings.retry_min_backoff_s, max(settings.retry_min_backoff_s, ceiling))  # noqa: S311
