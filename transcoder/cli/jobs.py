"""Job commands of the `transcoder` CLI: submit, status, list, logs, stop, retry, worker.

Exit codes: 0 done; 1 the job failed, was not found, or the operation does not apply;
2 a usage error (bad flags, an invalid request).

The service, the job store and the Redis client are imported inside the commands: every
`transcoder` invocation imports this module (to register the commands), and `transcoder run`
needs none of them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from transcoder.cli.app import app

if TYPE_CHECKING:
    from transcoder.models import JobRecord

console = Console()
errors = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="print the record(s) as JSON")]
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _fail(message: str, code: int = 1) -> NoReturn:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _reported() -> Iterator[None]:
    """Turn library errors into one line and an exit code (no tracebacks for users)."""
    import redis

    from transcoder.errors import RequestError, TranscoderError

    try:
        yield
    except RequestError as exc:
        _fail(str(exc), 2)
    except TranscoderError as exc:
        _fail(str(exc), 1)
    except redis.exceptions.RedisError as exc:
        _fail(f"cannot reach the job store (Redis): {type(exc).__name__}", 1)


def _record_json(record: JobRecord) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def parse_time(value: str | None) -> datetime | None:
    """ISO 8601 (naive means UTC) or a relative age like `30m`, `2h`, `1d` (that long ago)."""
    if value is None:
        return None
    match = _RELATIVE.match(value.strip())
    if match:
        return datetime.now(UTC) - timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use ISO 8601 or an age like 30m, 2h, 1d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _describe(record: JobRecord) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    request = record.request
    rows = [
        ("id", record.id),
        ("state", record.state.value),
        ("source", f"s3://{request.get('bucket')}/{request.get('object')}"),
        ("formats", ", ".join(request.get("dst_formats") or [str(request.get("dst_format"))])),
        ("created", str(record.created_at)),
        ("started", str(record.started_at or "-")),
        ("finished", str(record.finished_at or "-")),
        ("attempts", str(record.attempts)),
        ("worker", record.worker or "-"),
        ("progress", f"{record.progress.percent:.1f}% ({record.progress.phase})"),
    ]
    rows += [("output", f"{o.key} ({o.size} bytes)") for o in record.outputs]
    if record.error:
        rows.append(("error", f"{record.error.type}: {record.error.message}"))
    rows += [("destination", f"{d.uri} {d.condition}: {d.status}") for d in record.destinations]
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", value)
    console.print(table)


def _wait(job_id: str, show_bar: bool) -> JobRecord:
    """Poll the record until the job ends, with a live progress bar when asked."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from transcoder import service
    from transcoder.models import JobState

    if not show_bar:
        while not (record := service.get_job(job_id)).state.finished:
            time.sleep(0.5)
        return record
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(job_id, total=100, detail="queued")
        while True:
            record = service.get_job(job_id)
            progress = record.progress
            detail = f"{record.state.value} {progress.phase}"
            if progress.speed:
                detail += f" {progress.speed:.2f}x"
            if progress.eta_s is not None and record.state == JobState.RUNNING:
                detail += f" eta {progress.eta_s:.0f}s"
            bar.update(task, completed=progress.percent, detail=detail)
            if record.state.finished:
                return record
            time.sleep(0.5)


@app.command()
def submit(
    bucket: Annotated[str | None, typer.Option(help="source bucket")] = None,
    object_key: Annotated[str | None, typer.Option("--object", help="source object key")] = None,
    output_dir: Annotated[str, typer.Option("--output-dir", help="output key prefix")] = "",
    to: Annotated[str | None, typer.Option("--to", help="format(s), e.g. mov or mp4,webm")] = None,
    invocation_id: Annotated[str | None, typer.Option("--invocation-id", help="dedup id")] = None,
    output_bucket: Annotated[str | None, typer.Option("--output-bucket")] = None,
    event: Annotated[str | None, typer.Option("-e", "--event", help="the request as JSON")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Submit a job (flags or `-e '<json request>'`); `--wait` shows a live progress bar."""
    from transcoder import service
    from transcoder.models import JobState

    request: dict[str, Any] = {}
    if event:
        try:
            request = json.loads(event)
        except json.JSONDecodeError as exc:
            _fail(f"-e is not valid JSON: {exc.msg}", 2)
        if not isinstance(request, dict):
            _fail("-e must be a JSON object", 2)
    flags = {
        "bucket": bucket,
        "object": object_key,
        "output_bucket": output_bucket,
        "invocation_id": invocation_id,
        "output_dir": output_dir or None,
    }
    request.update({name: value for name, value in flags.items() if value is not None})
    if to:
        formats = [part.strip() for part in to.split(",") if part.strip()]
        request.pop("dst_format", None)
        request["dst_formats"] = formats
    with _reported():
        result = service.submit(request)
        record = result.record
        if not as_json:
            verb = "submitted" if result.created else "already exists, not run again"
            errors.print(f"job {record.id} {verb} ({record.state.value})", highlight=False)
        if wait:
            record = _wait(record.id, show_bar=not as_json)
    if as_json:
        _print_json(_record_json(record))
    elif wait:
        _describe(record)
    if wait and record.state != JobState.SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def status(job_id: str, as_json: JsonFlag = False) -> None:
    """Show one job's record."""
    from transcoder import service

    with _reported():
        record = service.get_job(job_id)
    if as_json:
        _print_json(_record_json(record))
    else:
        _describe(record)


@app.command("list")
def list_command(
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time or age (30m, 2h, 1d)")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time or age")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Jobs newest first (by state-entry time with --state, else by creation time)."""
    from rich.table import Table

    from transcoder import service

    with _reported():
        records = service.list_jobs(
            state=state,
            since=parse_time(since),
            until=parse_time(until),
            limit=limit,
            offset=offset,
        )
    if as_json:
        _print_json([_record_json(record) for record in records])
        return
    table = Table("id", "state", "source", "formats", "created", "attempts", "progress")
    for record in records:
        request = record.request
        table.add_row(
            record.id,
            record.state.value,
            str(request.get("object")),
            ",".join(request.get("dst_formats") or [str(request.get("dst_format"))]),
            record.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(record.attempts),
            f"{record.progress.percent:.0f}%",
        )
    console.print(table)


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="wait for new lines")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Print the job's log (lifecycle lines and ffmpeg's stderr)."""
    from transcoder import service

    with _reported():
        lines = service.job_logs(job_id)
        if as_json:
            _print_json(lines)
            return
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        store = service.get_store()
        seen = len(lines)
        while follow:
            finished = service.get_job(job_id).state.finished
            fresh = store.log_lines(job_id, seen)
            for line in fresh:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
            seen += len(fresh)
            if finished:
                break
            time.sleep(0.5)


def _operate(action: Callable[[str], JobRecord], job_id: str, as_json: bool, verb: str) -> None:
    with _reported():
        record = action(job_id)
    if as_json:
        _print_json(_record_json(record))
    else:
        errors.print(f"job {record.id} {verb}: now {record.state.value}", highlight=False)


@app.command()
def stop(job_id: str, as_json: JsonFlag = False) -> None:
    """Stop a job: a queued one never starts, a running one's ffmpeg is killed."""
    from transcoder import service

    _operate(lambda job: service.stop_job(job), job_id, as_json, "stop requested")


@app.command()
def retry(job_id: str, as_json: JsonFlag = False) -> None:
    """Run a failed, stopped or expired job again with the same request."""
    from transcoder import service

    _operate(lambda job: service.retry_job(job), job_id, as_json, "resubmitted")


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 1,
    pool: Annotated[str, typer.Option(help="prefork | solo | threads")] = "prefork",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated")] = "transcoder",
) -> None:
    """Start a Celery worker with the service's settings (`celery -A tasks worker -E ...`)."""
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "worker",
        "-E",
        "-Q",
        queues,
        "--prefetch-multiplier=1",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
    ]
    if hostname:
        args += ["-n", hostname]
    sys.stdout.flush()
    os.execv(sys.executable, args)  # noqa: S606 - a fixed argument list, no shell
