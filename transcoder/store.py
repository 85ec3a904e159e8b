"""The job store in Redis: records, state indexes, dedup, atomic transitions, log, leases.

A record is one JSON string (`keys.job`). Beside it: an internal hash (`keys.job_meta`: the
running attempt's token, attempts at the last submission, the submission time), the attempt's
lease (`keys.job_lease`, TTL `lease_ttl_s`), a stop flag and the bounded log. Every transition
runs as a WATCH/MULTI transaction over the record, the meta hash and the lease, so two attempts
can never both start, or both finish, one job; a finish of an attempt that lost its run token
(the reaper gave the job to another worker) is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from transcoder import keys
from transcoder.errors import InvalidStateError, JobNotFoundError, TranscoderError
from transcoder.models import (
    FINISHED_STATES,
    RETRYABLE_STATES,
    DestinationStatus,
    ErrorInfo,
    JobEvent,
    JobRecord,
    JobState,
    OutputObject,
    Progress,
)
from transcoder.settings import Settings, get_settings

#: the timeline keeps this many newest events (a job retried many times stays small)
MAX_EVENTS = 200
ACTIVE_STATES = (JobState.RUNNING, JobState.STOPPING)

_CREATE_LUA = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('zadd', KEYS[2], ARGV[2], ARGV[3])
redis.call('zadd', KEYS[3], ARGV[2], ARGV[3])
redis.call('hset', KEYS[4], 'base_attempts', 0, 'event_ms', ARGV[2])
if tonumber(ARGV[4]) > 0 then
  redis.call('expire', KEYS[1], ARGV[4])
  redis.call('expire', KEYS[4], ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('hset', KEYS[6], 'envelope', ARGV[6])
  redis.call('expire', KEYS[6], ARGV[4])
  redis.call('zadd', KEYS[5], ARGV[2], ARGV[5])
end
return 1
"""
# take an outbox entry that is due (score <= now): it is ours until now + window
_CLAIM_LUA = """
local due = redis.call('zscore', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
if redis.call('exists', KEYS[2]) == 0 then
  redis.call('zrem', KEYS[1], ARGV[1])
  return 0
end
redis.call('zadd', KEYS[1], ARGV[3], ARGV[1])
redis.call('hset', KEYS[2], 'claim', ARGV[4])
return 1
"""
# give a claimed entry back, due again at ARGV[3] (only while the claim is still ours)
_RESCHEDULE_LUA = """
if redis.call('hget', KEYS[2], 'claim') ~= ARGV[2] then return 0 end
redis.call('hdel', KEYS[2], 'claim')
redis.call('zadd', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""
# count one more attempt to one destination, unless the entry is gone (done elsewhere)
_COUNT_ATTEMPT_LUA = """
if redis.call('exists', KEYS[1]) == 0 then return -1 end
return redis.call('hincrby', KEYS[1], ARGV[1], 1)
"""
# renew only our own lease: a lease taken over by another attempt must not be extended
_RENEW_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


def now_utc() -> datetime:
    return datetime.now(UTC)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def redis_client(settings: Settings | None = None) -> redis.Redis:
    """A decoded-responses client for the configured Redis (the URL is a secret: never logged)."""
    settings = settings or get_settings()
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=30,
    )


@dataclass
class _Change:
    """What a transaction writes: a new record and side keys; `result` is handed back."""

    record: JobRecord | None = None
    meta_set: dict[str, Any] = field(default_factory=dict)
    meta_delete: tuple[str, ...] = ()
    lease_token: str | None = None  # set the lease to this token
    drop_lease: bool = False
    drop_stop_flag: bool = False
    set_stop_flag: bool = False
    result: Any = None


@dataclass
class StartOutcome:
    """What the store decided when an attempt asked to start: `started` or why not."""

    outcome: str  # started | missing | finished | busy | stopped | expired | exhausted
    record: JobRecord | None


def _event(record: JobRecord, name: str, detail: str = "") -> None:
    record.events.append(JobEvent(at=now_utc(), event=name, detail=detail))
    del record.events[:-MAX_EVENTS]


def error_info(error: TranscoderError) -> ErrorInfo:
    """The record form of an error (type, message, ffmpeg stderr tail)."""
    return ErrorInfo(type=error.error_type, message=error.message, stderr_tail=error.stderr_tail)


class JobStore:
    """Records, indexes and transitions of jobs; one instance per process is enough."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self._create = client.register_script(_CREATE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._reschedule = client.register_script(_RESCHEDULE_LUA)
        self._count_attempt = client.register_script(_COUNT_ATTEMPT_LUA)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> JobStore:
        settings = settings or get_settings()
        return cls(redis_client(settings), settings)

    # --- reading ------------------------------------------------------------------------
    def find(self, job_id: str) -> JobRecord | None:
        raw = self.client.get(keys.job(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def get(self, job_id: str) -> JobRecord:
        """The record of `job_id`; JobNotFoundError if it does not exist (or aged out)."""
        record = self.find(job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id!r} (unknown, or older than the retention)")
        return record

    def meta(self, job_id: str) -> dict[str, str]:
        return self.client.hgetall(keys.job_meta(job_id))  # type: ignore[return-value]

    def query(
        self,
        *,
        state: JobState | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Newest first from an index: by time entering `state`, else by creation time."""
        index = keys.state_index(state) if state else keys.JOBS_BY_CREATED
        self._prune(index)
        high = to_ms(until) if until else "+inf"
        low = to_ms(since) if since else "-inf"
        records: list[JobRecord] = []
        # entries whose record aged out are skipped, so page on until `limit` are found
        while len(records) < limit:
            ids = self.client.zrevrangebyscore(index, high, low, start=offset, num=limit)
            if not ids:
                break
            offset += len(ids)
            raws = self.client.mget([keys.job(job_id) for job_id in ids])  # type: ignore[union-attr]
            for raw in raws:
                if raw:
                    record = JobRecord.model_validate_json(raw)
                    if state is None or record.state == state:
                        records.append(record)
        return records[:limit]

    def count_by_state(self) -> dict[str, int]:
        for state in FINISHED_STATES:
            self._prune(keys.state_index(state))
        pipe = self.client.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(keys.state_index(state))
        return dict(zip([s.value for s in JobState], pipe.execute(), strict=True))

    def _prune(self, index: str) -> None:
        """Drop index entries older than the retention (their records expired with it).

        Entries of unfinished states are kept: their records do not expire."""
        if index in {keys.state_index(state) for state in JobState if state not in FINISHED_STATES}:
            return
        cutoff_ms = int((time.time() - self.settings.record_retention_s) * 1000)
        self.client.zremrangebyscore(index, "-inf", cutoff_ms)

    # --- creating -----------------------------------------------------------------------
    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Store a new record unless its id exists (atomic dedup); returns (record, created)."""
        created_ms = to_ms(record.created_at)
        retention = self.settings.record_retention_s if record.state in FINISHED_STATES else 0
        outbox = self._outbox_entry(record) if record.state in FINISHED_STATES else None
        delivery_id, body = outbox or ("", "")
        created = self._create(
            keys=[
                keys.job(record.id),
                keys.JOBS_BY_CREATED,
                keys.state_index(record.state),
                keys.job_meta(record.id),
                keys.DELIVERIES_PENDING,
                keys.delivery(delivery_id),
            ],
            args=[record.model_dump_json(), created_ms, record.id, retention, delivery_id, body],
        )
        if created:
            return record, True
        return self.get(record.id), False

    # --- the transaction core -----------------------------------------------------------
    def _transact(
        self, job_id: str, decide: Callable[[JobRecord | None, dict[str, str], str | None], _Change]
    ) -> Any:
        job_key, meta_key = keys.job(job_id), keys.job_meta(job_id)
        lease_key, stop_key = keys.job_lease(job_id), keys.job_stop(job_id)

        def run(pipe: Any) -> Any:
            raw = pipe.get(job_key)
            old = JobRecord.model_validate_json(raw) if raw else None
            change = decide(
                old.model_copy(deep=True) if old else None,
                pipe.hgetall(meta_key),
                pipe.get(lease_key),
            )
            pipe.multi()
            new = change.record
            if new is not None and old is not None:
                pipe.set(job_key, new.model_dump_json())
                if new.state != old.state:
                    pipe.zrem(keys.state_index(old.state), job_id)
                    pipe.zadd(keys.state_index(new.state), {job_id: int(time.time() * 1000)})
                if new.state in FINISHED_STATES:
                    for key in keys.job_keys(job_id):
                        pipe.expire(key, self.settings.record_retention_s)
                    if old.state not in FINISHED_STATES:
                        # the outbox: the delivery is owed in the same transaction as the end
                        self._write_outbox(pipe, new)
                else:
                    pipe.persist(job_key)
                    pipe.persist(meta_key)
                    pipe.persist(keys.job_log(job_id))
            if change.meta_set:
                pipe.hset(meta_key, mapping=change.meta_set)
            if change.meta_delete:
                pipe.hdel(meta_key, *change.meta_delete)
            if change.lease_token:
                pipe.set(lease_key, change.lease_token, px=int(self.settings.lease_ttl_s * 1000))
            if change.drop_lease:
                pipe.delete(lease_key)
            if change.drop_stop_flag:
                pipe.delete(stop_key)
            if change.set_stop_flag:
                pipe.set(stop_key, "1", ex=int(self.settings.job_time_limit_s) + 3600)
            return change.result

        return self.client.transaction(run, job_key, meta_key, lease_key, value_from_callable=True)

    # --- the delivery outbox ------------------------------------------------------------
    def _outbox_entry(self, record: JobRecord) -> tuple[str, str] | None:
        """(delivery id, envelope JSON) owed for a finished record; None without destinations."""
        from transcoder.destinations import condition_of, destination_uris, envelope

        condition = condition_of(record)
        if not destination_uris(record, condition, self.settings):
            return None
        finished_ms = to_ms(record.finished_at or record.created_at)
        delivery_id = keys.delivery_id(record.id, record.attempts, condition, finished_ms)
        return delivery_id, json.dumps(envelope(record, condition))

    def _write_outbox(self, pipe: Any, record: JobRecord) -> None:
        entry = self._outbox_entry(record)
        if entry is None:
            return
        delivery_id, body = entry
        pipe.hset(keys.delivery(delivery_id), "envelope", body)
        pipe.expire(keys.delivery(delivery_id), self.settings.record_retention_s)
        pipe.zadd(keys.DELIVERIES_PENDING, {delivery_id: int(time.time() * 1000)})

    def due_deliveries(self, limit: int) -> list[str]:
        """Ids of outbox entries that are due (never sent, failed and due again, or claimed
        by a sender that did not finish within its window), oldest first."""
        if limit < 1:
            return []
        now_ms = int(time.time() * 1000)
        found = self.client.zrangebyscore(keys.DELIVERIES_PENDING, "-inf", now_ms, 0, limit)
        return list(found)  # type: ignore[arg-type]

    def claim_delivery(self, delivery_id: str, window_s: float) -> str | None:
        """Take a due outbox entry for `window_s` (a claim token), or None if it is not due
        (another sender holds it) or gone."""
        token = uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        claimed = self._claim(
            keys=[keys.DELIVERIES_PENDING, keys.delivery(delivery_id)],
            args=[delivery_id, now_ms, now_ms + int(window_s * 1000), token],
        )
        return token if claimed else None

    def delivery_state(self, delivery_id: str) -> dict[str, str]:
        return self.client.hgetall(keys.delivery(delivery_id))  # type: ignore[return-value]

    def count_delivery_attempt(self, delivery_id: str, destination: str) -> int:
        """Number of this attempt to `destination` (1, 2, ...); -1 when the entry is gone."""
        found = self._count_attempt(
            keys=[keys.delivery(delivery_id)], args=[f"attempts:{destination}"]
        )
        return int(found)  # type: ignore[arg-type]

    def mark_destination_done(self, delivery_id: str, destination: str, outcome: str) -> None:
        """`destination` needs no more attempts for this entry (delivered or given up)."""
        key = keys.delivery(delivery_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, f"done:{destination}", outcome)
        pipe.expire(key, self.settings.record_retention_s)
        pipe.execute()

    def reschedule_delivery(self, delivery_id: str, token: str, delay_s: float) -> bool:
        """Release our claim; a reaper sends the entry again in `delay_s`."""
        due_ms = int((time.time() + delay_s) * 1000)
        return bool(
            self._reschedule(
                keys=[keys.DELIVERIES_PENDING, keys.delivery(delivery_id)],
                args=[delivery_id, token, due_ms],
            )
        )

    def complete_delivery(self, delivery_id: str) -> None:
        """Every destination of the entry is done: it leaves the outbox."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(keys.DELIVERIES_PENDING, delivery_id)
        pipe.delete(keys.delivery(delivery_id))
        pipe.execute()

    # --- attempts -----------------------------------------------------------------------
    def start(self, job_id: str, token: str, worker: str, *, task_id: str = "") -> StartOutcome:
        """Make `token` the job's running attempt, or say why this delivery must not run.

        `task_id` (the Celery task running the attempt) is kept beside the run token: a
        redelivery of that same message can then tell that its own task is the one running."""
        max_age_ms = self.settings.max_event_age_s * 1000

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None:
                return _Change(result=StartOutcome("missing", None))
            if rec.state in FINISHED_STATES:
                return _Change(result=StartOutcome("finished", rec))
            if rec.state in ACTIVE_STATES and lease:
                return _Change(result=StartOutcome("busy", rec))
            if rec.state == JobState.STOPPING:  # its worker died while stopping: the stop wins
                return self._finish_change(rec, JobState.STOPPED, "stopped", "worker lost")
            if rec.state == JobState.RUNNING and self._exhausted(rec, meta):
                rec.error = ErrorInfo(type="WorkerLost", message="the worker running it died")
                return self._finish_change(rec, JobState.FAILED, "exhausted", "worker lost")
            event_ms = float(meta.get("event_ms") or to_ms(rec.created_at))
            if rec.state != JobState.RUNNING and time.time() * 1000 - event_ms > max_age_ms:
                rec.error = ErrorInfo(
                    type="EventAgeExceeded",
                    message=f"older than the maximum event age ({max_age_ms / 1000:g} s)",
                )
                return self._finish_change(rec, JobState.EXPIRED, "expired", "event age exceeded")
            taking_over = rec.state == JobState.RUNNING
            rec.state = JobState.RUNNING
            rec.attempts += 1
            rec.worker = worker
            rec.started_at = now_utc()
            rec.finished_at = None
            rec.error = None
            rec.progress = Progress(phase="download")
            _event(rec, "started", f"attempt {rec.attempts} on {worker}")
            if taking_over:
                _event(rec, "takeover", "the previous attempt's lease had expired")
            return _Change(
                record=rec,
                meta_set={"run": token, "task": task_id},
                lease_token=token,
                result=StartOutcome("started", rec),
            )

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def _exhausted(self, rec: JobRecord, meta: dict[str, str]) -> bool:
        """True when this submission already used its first run and every retry."""
        used = rec.attempts - int(meta.get("base_attempts") or 0)
        return used >= self.settings.max_retries + 1

    def _finish_change(self, rec: JobRecord, state: JobState, outcome: str, why: str) -> _Change:
        rec.state = state
        rec.finished_at = now_utc()
        if state == JobState.STOPPED:
            rec.progress.eta_s = None
        _event(rec, state.value, why)
        return _Change(
            record=rec,
            meta_delete=("run",),
            drop_lease=True,
            drop_stop_flag=True,
            result=StartOutcome(outcome, rec),
        )

    def renew_lease(self, job_id: str, token: str) -> bool:
        """Extend our lease; False when it is gone or belongs to another attempt."""
        ttl_ms = int(self.settings.lease_ttl_s * 1000)
        return bool(self._renew(keys=[keys.job_lease(job_id)], args=[token, ttl_ms]))

    def stop_requested(self, job_id: str) -> bool:
        return bool(self.client.exists(keys.job_stop(job_id)))

    def update_running(self, job_id: str, token: str, **fields: Any) -> bool:
        """Set record fields (progress, commands, ...) of our running attempt; False if lost."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None or rec.state not in ACTIVE_STATES or meta.get("run") != token:
                return _Change(result=False)
            for name, value in fields.items():
                setattr(rec, name, value)
            return _Change(record=rec, result=True)

        return bool(self._transact(job_id, decide))

    def finish(
        self,
        job_id: str,
        token: str,
        state: JobState,
        *,
        error: ErrorInfo | None = None,
        outputs: list[OutputObject] | None = None,
        detail: str = "",
    ) -> tuple[str, JobRecord | None]:
        """End our attempt in `state`. Returns ("finished", record), ("lost", None) when the
        attempt no longer owns the job, or ("stop_requested", record) when a stop arrived
        before a success could be recorded (the caller removes the outputs and stops)."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None or rec.state not in ACTIVE_STATES or meta.get("run") != token:
                return _Change(result=("lost", None))
            if rec.state == JobState.STOPPING and state == JobState.SUCCEEDED:
                return _Change(result=("stop_requested", rec))
            rec.error = error
            if outputs is not None:
                rec.outputs = outputs
            if state == JobState.SUCCEEDED:
                rec.progress = Progress(percent=100.0, phase="done", eta_s=0.0)
            change = self._finish_change(rec, state, "finished", detail or state.value)
            change.result = ("finished", rec)
            return change

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def retry_later(self, job_id: str, token: str, error: ErrorInfo) -> JobRecord | None:
        """Our attempt failed transiently: state `retrying`, the run token released."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None or rec.state != JobState.RUNNING or meta.get("run") != token:
                return _Change(result=None)
            rec.state = JobState.RETRYING
            rec.error = error
            _event(rec, "retrying", f"{error.type}: {error.message}")
            return _Change(record=rec, meta_delete=("run",), drop_lease=True, result=rec)

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def can_retry(self, job_id: str) -> bool:
        """Whether a transient failure of the current attempt may be retried."""
        record = self.get(job_id)
        return not self._exhausted(record, self.meta(job_id))

    # --- operator actions and the reaper ------------------------------------------------
    def request_stop(self, job_id: str) -> tuple[JobRecord, bool]:
        """Stop a job: queued/retrying → stopped at once; running → stopping (its worker
        cancels). Returns (record, finished_now). InvalidStateError if it already ended."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None:
                raise JobNotFoundError(f"no job {job_id!r}")
            if rec.state in FINISHED_STATES:
                raise InvalidStateError(f"job {job_id} already ended ({rec.state.value})")
            if rec.state in (JobState.QUEUED, JobState.RETRYING):
                change = self._finish_change(
                    rec, JobState.STOPPED, "stopped", "stopped by operator"
                )
                change.result = (rec, True)
                return change
            if rec.state == JobState.RUNNING:
                rec.state = JobState.STOPPING
                _event(rec, "stopping", "stop requested by operator")
            return _Change(record=rec, set_stop_flag=True, result=(rec, False))

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def resubmit(self, job_id: str) -> JobRecord:
        """Operator retry of a failed/stopped/expired job: back to `queued` as a new submission."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None:
                raise JobNotFoundError(f"no job {job_id!r}")
            if rec.state not in RETRYABLE_STATES:
                raise InvalidStateError(
                    f"job {job_id} is {rec.state.value}; only failed, stopped or expired jobs "
                    "can be retried"
                )
            rec.state = JobState.QUEUED
            rec.finished_at = None
            rec.progress = Progress()
            _event(rec, "resubmitted", "retry requested by operator")
            return _Change(
                record=rec,
                meta_set={"base_attempts": rec.attempts, "event_ms": int(time.time() * 1000)},
                drop_stop_flag=True,
                result=rec,
            )

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def reap(self, job_id: str) -> StartOutcome:
        """A running/stopping job whose lease expired: `requeue` it (state retrying), or end
        it (`stopped` if it was stopping, `exhausted` when out of retries); else `busy`."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None or rec.state not in ACTIVE_STATES or lease:
                return _Change(result=StartOutcome("busy", rec))
            if rec.state == JobState.STOPPING:
                return self._finish_change(rec, JobState.STOPPED, "stopped", "worker lost")
            if self._exhausted(rec, meta):
                rec.error = ErrorInfo(type="WorkerLost", message="the worker running it died")
                return self._finish_change(rec, JobState.FAILED, "exhausted", "worker lost")
            rec.state = JobState.RETRYING
            _event(rec, "requeued", f"lease of attempt {rec.attempts} on {rec.worker} expired")
            return _Change(record=rec, meta_delete=("run",), result=StartOutcome("requeue", rec))

        return self._transact(job_id, decide)  # type: ignore[no-any-return]

    def abandoned(self) -> list[str]:
        """Ids of running/stopping jobs without a live lease (their worker died)."""
        ids: list[str] = []
        for state in ACTIVE_STATES:
            ids += self.client.zrange(keys.state_index(state), 0, -1)  # type: ignore[operator]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.job_lease(job_id))
        return [job_id for job_id, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def stale_waiting(self, older_than_s: float) -> list[JobRecord]:
        """Queued/retrying jobs waiting longer than `older_than_s` (their message was lost,
        e.g. a client died between creating the record and enqueueing). Each is returned
        once per period: its index score is moved to now."""
        cutoff_ms = int((time.time() - older_than_s) * 1000)
        now_ms = int(time.time() * 1000)
        found: list[JobRecord] = []
        for state in (JobState.QUEUED, JobState.RETRYING):
            index = keys.state_index(state)
            for job_id in self.client.zrangebyscore(index, "-inf", cutoff_ms, start=0, num=100):
                record = self.find(job_id)  # type: ignore[arg-type]
                if record is not None and record.state == state:
                    self.client.zadd(index, {job_id: now_ms}, xx=True)
                    found.append(record)
        return found

    def set_destination(self, job_id: str, status: DestinationStatus) -> None:
        """Record the delivery status of one destination (replacing its earlier status)."""

        def decide(rec: JobRecord | None, meta: dict[str, str], lease: str | None) -> _Change:
            if rec is None:
                return _Change()
            rec.destinations = [
                d
                for d in rec.destinations
                if (d.uri, d.condition) != (status.uri, status.condition)
            ] + [status]
            return _Change(record=rec)

        self._transact(job_id, decide)

    # --- the log ------------------------------------------------------------------------
    def log(self, job_id: str, *lines: str, stamped: bool = False) -> None:
        """Append lines to the job's bounded log (oldest lines fall off); `stamped` lines
        already start with their time (see `log_stamp`)."""
        if not lines:
            return
        stamp = log_stamp()
        key = keys.job_log(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, *(line if stamped else f"{stamp} {line}" for line in lines))
        pipe.ltrim(key, -self.settings.log_max_lines, -1)
        pipe.execute()

    def log_lines(self, job_id: str, start: int = 0) -> list[str]:
        return self.client.lrange(keys.job_log(job_id), start, -1)  # type: ignore[return-value]


def log_stamp() -> str:
    """The time prefix of log lines: ISO 8601 UTC with milliseconds."""
    return now_utc().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_token(worker: str) -> str:
    """A unique token for one attempt (worker name for humans, uuid for uniqueness)."""
    return f"{worker}/{uuid.uuid4().hex[:12]}"
