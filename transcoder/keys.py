"""Every Redis key the project uses, in one place, with what it holds and how long it lives.

Values with time in them carry the unit in their name. Job ids are validated
(`[A-Za-z_][A-Za-z0-9_-]{0,127}` or a generated uuid hex), so they are safe inside keys.
"""

from __future__ import annotations

PREFIX = "transcoder"

#: the built-in dead-letter list that `transcoder.dest_fail` pushes envelopes to (SPEC §6)
DLQ = f"{PREFIX}:dlq"

#: hash of counters and histogram buckets that `/metrics` reads (workers write, API reads)
METRICS = f"{PREFIX}:metrics"

#: sorted set of every job id, scored by created time (ms): the time-window index
JOBS_BY_CREATED = f"{PREFIX}:jobs:created"


def job(job_id: str) -> str:
    """The job record (JSON). Lives for the record retention after the job finishes."""
    return f"{PREFIX}:job:{job_id}"


def job_log(job_id: str) -> str:
    """The job's bounded log (a list capped at `log_max_lines`); same retention as the record."""
    return f"{PREFIX}:job:{job_id}:log"


def job_lease(job_id: str) -> str:
    """The running attempt's lease: worker id, TTL `lease_ttl_s`, renewed by the heartbeat.

    A running job whose lease is gone was abandoned by a dead worker; the reaper re-enqueues it.
    """
    return f"{PREFIX}:job:{job_id}:lease"


def state_index(state: str) -> str:
    """Sorted set of job ids in `state`, scored by the time (ms) they entered it."""
    return f"{PREFIX}:state:{state}"


#: the delivery outbox: a sorted set of pending deliveries (members `delivery_id`), scored by
#: the time (ms) from which a reaper may (re)send each one. An entry is written in the same
#: transaction as the job's finishing transition and removed once every destination is done.
DELIVERIES_PENDING = f"{PREFIX}:deliveries:pending"


def delivery_id(job_id: str, attempt: int, condition: str, finished_ms: int) -> str:
    """One completion to deliver: `finished_ms` (when the job ended) tells apart two
    completions with the same attempt count (a job stopped while queued, retried, and stopped
    again before it ran)."""
    return f"{job_id}:{attempt}:{condition}:{finished_ms}"


def delivery(delivery_id: str) -> str:
    """Hash of one outbox entry: `envelope` (JSON, fixed when the job ended, so every resend is
    the same), `claim` (the sender holding it), and per destination (its redacted URI)
    `attempts:<uri>` and `done:<uri>` (delivered | failed). Record retention; deleted when done."""
    return f"{PREFIX}:delivery:{delivery_id}"


def trigger_seen(event_digest: str) -> str:
    """Marks an object-upload event as already turned into a job (redelivery guard)."""
    return f"{PREFIX}:trigger:{event_digest}"


# --- worker service (job store internals) ---------------------------------------------------

#: lock held by the one reaper acting at a time (TTL ≈ the reaper interval)
REAPER_LOCK = f"{PREFIX}:reaper:lock"

#: the Celery queue transcode messages go to (a broker key, named here for completeness)
QUEUE = "transcoder"


def job_meta(job_id: str) -> str:
    """Internal hash beside the record: `run` (the current attempt's token), `base_attempts`
    (attempts when last (re)submitted, so retries are counted per submission) and `event_ms`
    (when last (re)submitted: the maximum event age counts from here). Same retention."""
    return f"{PREFIX}:job:{job_id}:meta"


def job_stop(job_id: str) -> str:
    """Stop flag of a running job; its worker's watcher polls it and cancels ffmpeg."""
    return f"{PREFIX}:job:{job_id}:stop"


def job_keys(job_id: str) -> tuple[str, ...]:
    """Every key of one job that lives for the record retention once the job finished."""
    return (job(job_id), job_log(job_id), job_meta(job_id))


def dlq_guard(job_id: str, attempt: int, condition: str, envelope_ms: int) -> str:
    """Set-once marker so `transcoder.dest_fail` pushes each envelope once, even when its
    message is delivered twice (an envelope's `timestamp` is fixed when it is built)."""
    return f"{PREFIX}:dlq:seen:{job_id}:{attempt}:{condition}:{envelope_ms}"
