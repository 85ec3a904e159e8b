"""The HTTP API and the object-upload webhook: a thin FastAPI shell over `transcoder.service`.

Run it with `transcoder api` (or `uvicorn --factory transcoder.api:create_app`). Status codes:
201 a new job, 200 an existing one (`X-Transcoder-Duplicate: true`), 401/403 webhook auth,
404 unknown job, 409 operation not valid in the job's state, 413 body too large, 422 invalid
input (a readable `detail`), 503 Redis/broker unavailable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Annotated, Any

import redis
from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from transcoder import __version__, metrics, triggers
from transcoder.errors import (
    InvalidStateError,
    JobNotFoundError,
    RequestError,
    TranscoderError,
)
from transcoder.models import JobRecord, JobRequest, JobState
from transcoder.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: response header of `POST /jobs`: "true" when the invocation id already existed
DUPLICATE_HEADER = "X-Transcoder-Duplicate"
#: a path job id; ids that cannot exist answer 404 (see `_check_job_id`), not 422
JobId = Annotated[str, Path(max_length=200)]
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,127}$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _service() -> Any:
    """The job service, imported on first use (the API module must import without it)."""
    from transcoder import service

    return service


# --- response bodies (for the OpenAPI document) ---------------------------------------------


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, in words")
    error: str = Field("", description="stable error type, e.g. JobNotFound, InvalidState")


class JobLogs(BaseModel):
    id: str
    lines: list[str]


class HookJob(BaseModel):
    id: str
    created: bool = Field(description="false: a redelivery of an event already turned into a job")
    bucket: str
    key: str


class HookIgnored(BaseModel):
    bucket: str
    key: str
    reason: str


class HookResult(BaseModel):
    jobs: list[HookJob] = Field(default_factory=list)
    ignored: list[HookIgnored] = Field(default_factory=list)


class Health(BaseModel):
    status: str
    redis: str
    triggers: str
    version: str = __version__


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such job"},
    409: {"model": ErrorBody, "description": "not possible in the job's current state"},
    422: {"model": ErrorBody, "description": "invalid input"},
    503: {"model": ErrorBody, "description": "job store or broker unavailable"},
}


# --- body size limit ------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_body_bytes` with 413."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await self._too_large()(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # chunked bodies have no Content-Length
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"

    def _too_large(self) -> JSONResponse:
        return JSONResponse({"detail": self._message(), "error": "PayloadTooLarge"}, 413)


# --- helpers --------------------------------------------------------------------------------


def _readable(exc: RequestValidationError) -> str:
    """One line per problem: `field: message`, without pydantic's boilerplate."""
    lines = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        elif error.get("type") == "json_invalid":
            message = "body is not valid JSON"
        lines.append(f"{'.'.join(location)}: {message}" if location else message)
    return "; ".join(lines) or "invalid request"


def _error(status: int, detail: str, error: str = "") -> JSONResponse:
    return JSONResponse({"detail": detail, "error": error}, status_code=status)


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id):
        raise JobNotFoundError(f"no job {job_id[:140]!r}")
    return job_id


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)  # a time without zone means UTC


def _record(
    record: JobRecord, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(record.model_dump(mode="json"), status_code=status, headers=headers)


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --- the application ------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: the process settings from the environment)."""
    settings = settings or get_settings()
    redis_client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_timeout=5, socket_connect_timeout=3
    )
    rules = triggers.RulesCache(settings.triggers)

    registry = metrics.build_registry(redis_client, lambda: _service().stats(settings=settings))

    app = FastAPI(
        title="transcoder",
        version=__version__,
        description=(
            "FFmpeg transcoding jobs: submit, query, stop, retry; the S3/MinIO upload webhook; "
            "health and Prometheus metrics. Job records have the shape of SPEC §4."
        ),
    )
    app.state.settings = settings
    app.state.redis = redis_client
    app.state.rules = rules
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.api_max_body_bytes)

    # --- error mapping ------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _readable(exc), "RequestError")

    @app.exception_handler(TranscoderError)
    async def _transcoder_error(_request: Request, exc: TranscoderError) -> JSONResponse:
        if isinstance(exc, JobNotFoundError):
            return _error(404, exc.message, exc.error_type)
        if isinstance(exc, InvalidStateError):
            return _error(409, exc.message, exc.error_type)
        if isinstance(exc, RequestError):
            return _error(422, exc.message, exc.error_type)
        if exc.retryable:
            return _error(503, exc.message, exc.error_type)
        logger.error("request failed: %s: %s", exc.error_type, exc.message)
        return _error(500, exc.message, exc.error_type)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_request: Request, exc: redis.RedisError) -> JSONResponse:
        logger.warning("job store unavailable: %s", type(exc).__name__)
        return _error(503, "job store (Redis) unavailable; try again", "Unavailable")

    # publishing the Celery message fails with kombu's OperationalError when Redis is down
    @app.exception_handler(OperationalError)
    async def _broker_down(_request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning("broker unavailable: %s", type(exc).__name__)
        return _error(503, "broker unavailable; try again", "Unavailable")

    # --- jobs -----------------------------------------------------------------------------
    @app.post(
        "/jobs",
        response_model=JobRecord,
        status_code=201,
        responses={
            200: {"model": JobRecord, "description": "the invocation id existed: that job"},
            **_ERRORS,
        },
        summary="Submit a job",
        description=(
            "201 and the new job's record; 200 and the EXISTING job's record when "
            "`invocation_id` was already used (nothing runs again). Header "
            f"`{DUPLICATE_HEADER}` says which: `true` for a dedup hit."
        ),
    )
    def submit_job(job: JobRequest) -> Response:
        result = _service().submit(job, settings=settings)
        duplicate = not result.created
        return _record(
            result.record,
            status=200 if duplicate else 201,
            headers={
                DUPLICATE_HEADER: "true" if duplicate else "false",
                "Location": f"/jobs/{result.record.id}",
            },
        )

    @app.get(
        "/jobs",
        response_model=list[JobRecord],
        responses={422: _ERRORS[422], 503: _ERRORS[503]},
        summary="List jobs, newest first",
    )
    def list_jobs(
        state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
        since: Annotated[datetime | None, Query(description="created at/after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        since, until = _utc(since), _utc(until)
        if since and until and since > until:
            raise RequestError("since must not be after until")
        records = _service().list_jobs(
            state=state,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            settings=settings,
        )
        return JSONResponse([record.model_dump(mode="json") for record in records])

    @app.get("/jobs/{job_id}", response_model=JobRecord, responses=_ERRORS, summary="A job")
    def get_job(job_id: JobId) -> Response:
        return _record(_service().get_job(_check_job_id(job_id), settings=settings))

    @app.get("/jobs/{job_id}/logs", response_model=JobLogs, responses=_ERRORS, summary="Its log")
    def job_logs(job_id: JobId) -> JobLogs:
        lines = _service().job_logs(_check_job_id(job_id), settings=settings)
        return JobLogs(id=job_id, lines=list(lines))

    @app.post(
        "/jobs/{job_id}/stop",
        response_model=JobRecord,
        responses=_ERRORS,
        summary="Stop a queued or running job (409 if it already finished)",
    )
    def stop_job(job_id: JobId) -> Response:
        return _record(_service().stop_job(_check_job_id(job_id), settings=settings))

    @app.post(
        "/jobs/{job_id}/retry",
        response_model=JobRecord,
        responses=_ERRORS,
        summary="Run a failed, stopped or expired job again (409 otherwise)",
    )
    def retry_job(job_id: JobId) -> Response:
        return _record(_service().retry_job(_check_job_id(job_id), settings=settings))

    # --- the upload webhook ----------------------------------------------------------------
    def _authorize(request: Request) -> None:
        expected = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
        if not expected:
            raise HTTPException(403, "webhook disabled: TRANSCODER_WEBHOOK_TOKEN is not set")
        given = _bearer_token(request)
        if given is None:
            raise HTTPException(
                401, "bearer token required", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(403, "invalid token")

    def _handle_events(body: Any) -> HookResult:
        events = triggers.parse_event(body)
        try:
            current_rules = rules.get()
        except triggers.TriggerRulesError as exc:
            logger.error("triggers file unusable: %s", exc)
            raise HTTPException(500, f"trigger rules unusable: {exc}") from None
        result = HookResult()
        for event in events:
            if not current_rules:
                decision = triggers.Decision(event, ignored="no trigger rules configured")
            else:
                decision = triggers.plan_jobs(event, current_rules)
            if triggers.needs_metadata_check(decision) and _written_by_service(event):
                decision = triggers.Decision(event, ignored="object was written by the service")
            if decision.ignored:
                logger.info(
                    "hook: ignored s3://%s/%s: %s", event.bucket, event.key, decision.ignored
                )
                result.ignored.append(
                    HookIgnored(bucket=event.bucket, key=event.key, reason=decision.ignored)
                )
            for job_request in decision.requests:
                submitted = _service().submit(job_request, settings=settings)
                result.jobs.append(
                    HookJob(
                        id=submitted.record.id,
                        created=submitted.created,
                        bucket=event.bucket,
                        key=event.key,
                    )
                )
                logger.info(
                    "hook: s3://%s/%s -> job %s (%s)",
                    event.bucket,
                    event.key,
                    submitted.record.id,
                    "new" if submitted.created else "redelivery",
                )
        return result

    s3_clients: list[Any] = []  # one S3 client per app, made on first need

    def _written_by_service(event: triggers.ObjectEvent) -> bool:
        """Does the object carry the workers' marker? Fails open: a missing or unreachable
        object is reported by the job itself, and the static guard still applies."""
        try:
            if not s3_clients:
                import urllib3
                from minio import Minio

                s3_clients.append(
                    Minio(
                        settings.s3_endpoint,
                        access_key=settings.s3_access_key.get_secret_value(),
                        secret_key=settings.s3_secret_key.get_secret_value(),
                        secure=settings.s3_secure,
                        region=settings.s3_region,
                        # the hook must answer fast: no retries, short timeouts
                        http_client=urllib3.PoolManager(
                            timeout=urllib3.Timeout(connect=2, read=5), retries=False, maxsize=8
                        ),
                    )
                )
            stat = s3_clients[0].stat_object(event.bucket, event.key)
        except Exception as exc:
            logger.info(
                "hook: cannot stat s3://%s/%s: %s", event.bucket, event.key, type(exc).__name__
            )
            return False
        return triggers.has_output_metadata(stat.metadata or {})

    @app.head("/hooks/s3", include_in_schema=False)
    async def hook_probe() -> Response:
        # MinIO probes a webhook target with HEAD before it sends events
        return Response(status_code=200)

    @app.post(
        "/hooks/s3",
        response_model=HookResult,
        responses={
            401: {"model": ErrorBody, "description": "no bearer token"},
            403: {"model": ErrorBody, "description": "wrong token, or no token configured"},
            **_ERRORS,
        },
        summary="S3/MinIO bucket notification (bearer token required)",
        description=(
            'Takes `{"Records": [...]}` as MinIO/S3 send it. Each `s3:ObjectCreated:*` '
            "record whose bucket/key matches a trigger rule becomes a job; a redelivery "
            "(same bucket, key and eTag or sequencer) returns the existing job "
            "(`created: false`); other events and the service's own outputs are ignored."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    )
    async def s3_hook(request: Request) -> HookResult:
        _authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError("body is not valid JSON") from None
        return await asyncio.to_thread(_handle_events, body)

    # --- operations -------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz() -> Response:
        try:
            redis_client.ping()
            redis_state = "ok"
        except redis.RedisError as exc:
            redis_state = f"unavailable ({type(exc).__name__})"
        try:
            triggers_state = f"{len(rules.get())} rules" if settings.triggers else "none"
        except triggers.TriggerRulesError as exc:
            triggers_state = f"error: {exc}"
        healthy = redis_state == "ok"
        body = Health(
            status="ok" if healthy else "unavailable", redis=redis_state, triggers=triggers_state
        )
        return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus metrics (transcoder_*)",
    )
    def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def __getattr__(name: str) -> Any:
    # `uvicorn transcoder.api:app` works without building an app at import time
    if name == "app":
        return create_app()
    raise AttributeError(name)
