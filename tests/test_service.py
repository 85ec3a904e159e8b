"""The service calls (what the CLI and API use) against the real Redis, without workers:
validation, dedup under concurrency, queries, stop/retry of queued jobs, stats, the CLI."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from transcoder import keys, service
from transcoder.errors import InvalidStateError, JobNotFoundError, RequestError
from transcoder.models import JobState
from transcoder.settings import Settings

SEED = {"bucket": "my-bucket", "object": "480P.mp4", "output_dir": "a", "dst_format": "mov"}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, on_failure="redis-list:failures")  # type: ignore[arg-type]


def queued_messages(settings: Settings) -> list[dict]:
    client = service.get_store(settings).client
    return [json.loads(raw) for raw in client.lrange(keys.QUEUE, 0, -1)]


def test_invalid_requests_are_rejected_with_a_clear_message(settings: Settings) -> None:
    with pytest.raises(RequestError, match="unknown field 'colour'"):
        service.submit({**SEED, "colour": "red"}, settings=settings)
    with pytest.raises(RequestError, match="output_dir"):
        service.submit({**SEED, "output_dir": "../up"}, settings=settings)
    with pytest.raises(RequestError, match="JSON object"):
        service.submit("not a dict", settings=settings)  # type: ignore[arg-type]
    assert service.list_jobs(settings=settings) == []


def test_twenty_concurrent_duplicates_make_one_job(settings: Settings) -> None:
    barrier = threading.Barrier(20)
    created: list[bool] = []

    def submit() -> None:
        barrier.wait()
        created.append(
            service.submit({**SEED, "invocation_id": "dup_1"}, settings=settings).created
        )

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert created.count(True) == 1
    assert len(queued_messages(settings)) == 1  # enqueued once
    assert [r.id for r in service.list_jobs(settings=settings)] == ["dup_1"]


def test_record_json_has_the_spec_keys(settings: Settings) -> None:
    record = service.submit(SEED, settings=settings).record
    assert set(record.model_dump(mode="json")) == {
        "id",
        "invocation_id",
        "state",
        "request",
        "created_at",
        "started_at",
        "finished_at",
        "attempts",
        "worker",
        "progress",
        "outputs",
        "commands",
        "error",
        "events",
        "destinations",
    }
    assert set(record.progress.model_dump()) == {"percent", "fps", "speed", "eta_s", "phase"}
    assert service.get_job(record.id, settings=settings).state == JobState.QUEUED
    assert "submitted" in service.job_logs(record.id, settings=settings)[0]
    with pytest.raises(JobNotFoundError):
        service.get_job("nope", settings=settings)


def test_stop_queued_job_then_retry(settings: Settings) -> None:
    job_id = service.submit({**SEED, "invocation_id": "stop_me"}, settings=settings).record.id
    stopped = service.stop_job(job_id, settings=settings)
    assert stopped.state == JobState.STOPPED
    client = service.get_store(settings).client
    raw = client.lindex("failures", 0)
    assert raw is not None, "no Stopped envelope"
    envelope = json.loads(raw)
    assert envelope["requestContext"]["condition"] == "Stopped"
    with pytest.raises(InvalidStateError):
        service.stop_job(job_id, settings=settings)
    assert service.retry_job(job_id, settings=settings).state == JobState.QUEUED
    assert len(queued_messages(settings)) == 2  # the submission and the retry
    with pytest.raises(InvalidStateError):
        service.retry_job(job_id, settings=settings)  # queued: nothing to retry


def test_list_by_state_and_window(settings: Settings) -> None:
    first = service.submit({**SEED, "invocation_id": "a_1"}, settings=settings).record
    time.sleep(0.01)
    middle = datetime.now(UTC)
    time.sleep(0.01)
    service.submit({**SEED, "invocation_id": "b_2"}, settings=settings)
    service.submit({**SEED, "invocation_id": "c_3"}, settings=settings)
    service.stop_job("b_2", settings=settings)
    assert [r.id for r in service.list_jobs(settings=settings)] == ["c_3", "b_2", "a_1"]
    assert [r.id for r in service.list_jobs(since=middle, settings=settings)] == ["c_3", "b_2"]
    assert [r.id for r in service.list_jobs(until=middle, settings=settings)] == [first.id]
    assert [r.id for r in service.list_jobs(state="stopped", settings=settings)] == ["b_2"]
    assert [r.id for r in service.list_jobs(state="queued", limit=1, settings=settings)] == ["c_3"]
    assert [r.id for r in service.list_jobs(state="queued", offset=1, settings=settings)] == ["a_1"]
    with pytest.raises(RequestError):
        service.list_jobs(state="sleeping", settings=settings)
    stats = service.stats(settings=settings)
    assert stats["jobs_by_state"]["queued"] == 2 and stats["jobs_by_state"]["stopped"] == 1
    assert stats["queue_depth"] == 3 and stats["running"] == []


def test_cli_json_and_exit_codes(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transcoder.cli import app
    from transcoder.settings import get_settings

    monkeypatch.setenv("TRANSCODER_REDIS_URL", redis_url)
    get_settings.cache_clear()
    service._stores.clear()
    runner = CliRunner()
    try:
        submitted = runner.invoke(
            app,
            [
                "submit",
                "--bucket",
                "my-bucket",
                "--object",
                "480P.mp4",
                "--output-dir",
                "a",
                "--to",
                "mov",
                "--invocation-id",
                "cli_1",
                "--json",
            ],
        )
        assert submitted.exit_code == 0, submitted.output
        assert json.loads(submitted.stdout)["id"] == "cli_1"
        listed = runner.invoke(app, ["list", "--json", "--state", "queued", "--since", "1h"])
        assert [r["id"] for r in json.loads(listed.stdout)] == ["cli_1"]
        status = runner.invoke(app, ["status", "cli_1", "--json"])
        assert json.loads(status.stdout)["state"] == "queued"
        assert runner.invoke(app, ["status", "missing"]).exit_code == 1
        assert runner.invoke(app, ["submit", "-e", '{"bucket": "my-bucket"}']).exit_code == 2
        assert runner.invoke(app, ["list", "--since", "yesterday-ish"]).exit_code == 2
        assert runner.invoke(app, ["stop", "cli_1", "--json"]).exit_code == 0
        assert runner.invoke(app, ["stop", "cli_1"]).exit_code == 1  # already stopped
        logs = runner.invoke(app, ["logs", "cli_1", "--json"])
        assert any("stop requested" in line for line in json.loads(logs.stdout))
    finally:
        get_settings.cache_clear()
        service._stores.clear()
