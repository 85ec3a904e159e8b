"""Destinations: the exact envelope, each URI kind, once-only delivery, retried failures."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from conftest import free_port

from transcoder import destinations
from transcoder.models import ErrorInfo, JobRecord, JobState, OutputObject
from transcoder.settings import Settings
from transcoder.store import JobStore

REQUEST = {"bucket": "my-bucket", "object": "480P.mp4", "output_dir": "a", "dst_format": "mov"}


@pytest.fixture
def store(redis_url: str) -> JobStore:
    settings = Settings(redis_url=redis_url, on_success="redis-list:ok", delivery_max_attempts=2)  # type: ignore[arg-type]
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
        error=error,
        outputs=[OutputObject(key="a/480P.mov", size=10)],
    )


class Calls:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, dict[str, Any]]] = []
        self.retries: list[tuple[Any, ...]] = []

    def send_task(self, name: str, body: dict[str, Any]) -> None:
        self.tasks.append((name, body))

    def schedule_retry(self, *args: Any) -> None:
        self.retries.append(args)


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
    store.create(record)
    calls = Calls()
    assert destinations.deliver_once(
        store, record, send_task=calls.send_task, schedule_retry=calls.schedule_retry
    )
    assert not destinations.deliver_once(
        store, record, send_task=calls.send_task, schedule_retry=calls.schedule_retry
    )
    assert store.client.llen("ok") == 1
    status = store.get(record.id).destinations
    assert [(d.uri, d.condition, d.status) for d in status] == [
        ("redis-list:ok", "Success", "delivered")
    ]


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
        record = finished_record()
        store.create(record)
        uri = f"http://user:secret@127.0.0.1:{server.server_port}/hook?token=abc"
        calls = Calls()
        body = destinations.envelope(record)
        assert not destinations.attempt_delivery(
            store,
            record.id,
            uri,
            "Success",
            body,
            1,
            send_task=calls.send_task,
            schedule_retry=calls.schedule_retry,
        )
        assert calls.retries and calls.retries[0][4] == 2  # next attempt scheduled
        status = store.get(record.id).destinations[0]
        assert status.status == "pending" and "500" in status.last_error
        assert "secret" not in status.uri and "token" not in status.uri
        assert destinations.attempt_delivery(
            store,
            record.id,
            uri,
            "Success",
            body,
            2,
            send_task=calls.send_task,
            schedule_retry=calls.schedule_retry,
        )
        assert store.get(record.id).destinations[0].status == "delivered"
        assert received[1]["requestContext"]["requestId"] == record.id
    finally:
        server.shutdown()
        server.server_close()


def test_last_failed_attempt_is_recorded_as_failed(store: JobStore) -> None:
    record = finished_record()
    store.create(record)
    calls = Calls()
    uri = f"http://127.0.0.1:{free_port()}/nobody-listens"
    destinations.attempt_delivery(
        store,
        record.id,
        uri,
        "Success",
        {},
        2,
        send_task=calls.send_task,
        schedule_retry=calls.schedule_retry,
    )
    assert not calls.retries
    assert store.get(record.id).destinations[0].status == "failed"
