"""Destinations: the exact envelope, each URI kind, the outbox (once-only delivery that
survives its sender, retried failures)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from conftest import free_port

from transcoder import destinations, keys
from transcoder.models import ErrorInfo, JobRecord, JobState, OutputObject
from transcoder.settings import Settings
from transcoder.store import JobStore, now_utc

REQUEST = {"bucket": "my-bucket", "object": "480P.mp4", "output_dir": "a", "dst_format": "mov"}


@pytest.fixture
def store(redis_url: str) -> JobStore:
    settings = Settings(
        redis_url=redis_url,  # type: ignore[arg-type]
        on_success="redis-list:ok",
        delivery_max_attempts=2,
        retry_min_backoff_s=0,
        retry_max_backoff_s=0,
    )
    return JobStore.from_settings(settings)


def finished_record(
    state: JobState = JobState.SUCCEEDED, error: ErrorInfo | None = None
) -> JobRecord:
    return JobRecord(
        id="my1-480P-mp4",
        invocation_id="my1-480P-mp4",
        state=state,
        request=REQUEST,
        created_at=datetime.now(UTC),
        attempts=1,
        finished_at=now_utc(),
        error=error,
        outputs=[OutputObject(key="a/480P.mov", size=10)],
    )


class Calls:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, body: dict[str, Any]) -> None:
        self.tasks.append((name, body))


def finish(store: JobStore, record: JobRecord) -> str:
    """Store a finished record the way the job store ends a job: with its outbox entry."""
    created, _ = store.create(record)
    return destinations.delivery_id_of(created)


def pending(store: JobStore) -> list[str]:
    return store.client.zrange(keys.DELIVERIES_PENDING, 0, -1)  # type: ignore[return-value]


def test_success_envelope_is_exact() -> None:
    body = destinations.envelope(finished_record())
    assert set(body) == {
        "version",
        "timestamp",
        "requestContext",
        "requestPayload",
        "responseContext",
        "responsePayload",
    }
    assert body["version"] == "1.0" and isinstance(body["timestamp"], int)
    assert body["requestContext"] == {
        "requestId": "my1-480P-mp4",
        "functionArn": "transcoder.transcode",
        "condition": "Success",
        "approximateInvokeCount": 1,
    }
    assert body["requestPayload"] == REQUEST
    assert body["responseContext"] == {"statusCode": 200, "functionError": ""}
    assert body["responsePayload"]["outputs"] == [{"key": "a/480P.mov", "size": 10}]


@pytest.mark.parametrize(
    ("state", "error_type", "condition", "function_error"),
    [
        (JobState.FAILED, "MediaError", "RetriesExhausted", "Handled"),
        (JobState.FAILED, "InternalError", "RetriesExhausted", "Unhandled"),
        (JobState.STOPPED, "Cancelled", "Stopped", "Handled"),
        (JobState.EXPIRED, "EventAgeExceeded", "EventAgeExceeded", "Handled"),
        (JobState.INVALID, "RequestError", "InvalidRequest", "Handled"),
    ],
)
def test_failure_envelopes(
    state: JobState, error_type: str, condition: str, function_error: str
) -> None:
    error = ErrorInfo(type=error_type, message="why", stderr_tail="moov atom not found")
    body = destinations.envelope(finished_record(state, error))
    assert body["requestContext"]["condition"] == condition
    assert body["responseContext"]["functionError"] == function_error
    assert body["responsePayload"] == {
        "errorType": error_type,
        "errorMessage": "why",
        "stderrTail": "moov atom not found",
    }


def test_delivered_once_per_completion(store: JobStore) -> None:
    record = finished_record()
    delivery_id = finish(store, record)
    assert pending(store) == [delivery_id]  # owed from the moment the job ended
    calls = Calls()
    assert destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
    assert not destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
    assert store.client.llen("ok") == 1
    assert pending(store) == []
    status = store.get(record.id).destinations
    assert [(d.uri, d.condition, d.status) for d in status] == [
        ("redis-list:ok", "Success", "delivered")
    ]


def test_a_sender_that_died_is_replaced_once_its_claim_runs_out(store: JobStore) -> None:
    """The finishing worker claimed the delivery and died: nobody else sends it while the
    claim holds; afterwards a reaper does, with the envelope fixed when the job ended."""
    record = finished_record()
    delivery_id = finish(store, record)
    envelope = store.delivery_state(delivery_id)["envelope"]
    assert store.claim_delivery(delivery_id, window_s=60) is not None  # then SIGKILL
    calls = Calls()
    assert store.due_deliveries(10) == []
    assert not destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
    store.client.zadd(keys.DELIVERIES_PENDING, {delivery_id: 0}, xx=True)  # the claim ran out
    assert store.due_deliveries(10) == [delivery_id]
    assert destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
    assert [json.loads(raw) for raw in store.client.lrange("ok", 0, -1)] == [json.loads(envelope)]


def test_a_redis_destination_already_pushed_is_not_pushed_again(store: JobStore) -> None:
    """A sender that died after its push (the claim runs out) leaves nothing to resend."""
    record = finished_record()
    delivery_id = finish(store, record)
    token = store.claim_delivery(delivery_id, window_s=60)
    assert token is not None
    body = json.loads(store.delivery_state(delivery_id)["envelope"])
    destinations.send(
        "redis-list:ok", body, store=store, send_task=Calls().send_task,
        done=(delivery_id, "redis-list:ok"),
    )  # fmt: skip
    store.client.zadd(keys.DELIVERIES_PENDING, {delivery_id: 0}, xx=True)  # then SIGKILL
    assert destinations.deliver_pending(store, delivery_id, send_task=Calls().send_task)
    assert store.client.llen("ok") == 1
    assert pending(store) == []


def test_request_overrides_and_kinds(store: JobStore) -> None:
    calls = Calls()
    for uri in ("redis-stream:events", "task:my.hook"):
        destinations.send(uri, {"a": 1}, store=store, send_task=calls.send_task)
    assert json.loads(store.client.xrange("events")[0][1]["envelope"]) == {"a": 1}
    assert calls.tasks == [("my.hook", {"a": 1})]
    record = finished_record(JobState.FAILED)
    record.request = {**REQUEST, "on_failure": "redis-list:mine"}
    assert destinations.destination_uris(record, "RetriesExhausted", store.settings) == [
        "redis-list:mine"
    ]
    with pytest.raises(destinations.DeliveryError):
        destinations.send("ftp://nope", {}, store=store, send_task=calls.send_task)


def test_http_delivery_and_retry(store: JobStore) -> None:
    received: list[dict[str, Any]] = []
    answers = [500, 200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(answers.pop(0))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://user:secret@127.0.0.1:{server.server_port}/hook?token=abc"
        record = finished_record()
        record.request = {**REQUEST, "on_success": uri}
        delivery_id = finish(store, record)
        calls = Calls()
        assert destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
        status = store.get(record.id).destinations[0]
        assert status.status == "pending" and "500" in status.last_error
        assert status.attempts == 1
        assert "secret" not in status.uri and "token" not in status.uri
        assert pending(store) == [delivery_id]  # due again after the backoff (0 s here)
        # the outbox names destinations by their redacted URI
        assert not [f for f in store.delivery_state(delivery_id) if "secret" in f]
        assert destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
        status = store.get(record.id).destinations[0]
        assert (status.status, status.attempts) == ("delivered", 2)
        assert pending(store) == []
        assert received[0] == received[1]  # the same envelope, timestamp included
        assert received[1]["requestContext"]["requestId"] == record.id
    finally:
        server.shutdown()
        server.server_close()


def test_last_failed_attempt_is_recorded_as_failed(store: JobStore) -> None:
    record = finished_record()
    record.request = {**REQUEST, "on_success": f"http://127.0.0.1:{free_port()}/nobody-listens"}
    delivery_id = finish(store, record)
    calls = Calls()
    for _ in range(2):  # delivery_max_attempts
        assert destinations.deliver_pending(store, delivery_id, send_task=calls.send_task)
    assert store.get(record.id).destinations[0].status == "failed"
    assert store.get(record.id).destinations[0].attempts == 2
    assert pending(store) == []  # given up: it leaves the outbox
