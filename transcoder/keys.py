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


def delivery_guard(job_id: str, attempt: int, condition: str) -> str:
    """Set-once marker so a job completion is delivered to its destinations only once."""
    return f"{PREFIX}:job:{job_id}:delivered:{attempt}:{condition}"


def trigger_seen(event_digest: str) -> str:
    """Marks an object-upload event as already turned into a job (redelivery guard)."""
    return f"{PREFIX}:trigger:{event_digest}"
