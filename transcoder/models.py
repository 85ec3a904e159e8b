"""What a job *is*: the request a client sends and the record the service keeps."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: every output format; `transcoder.formats` says how each one is written
FORMATS = ("mov", "flv", "avi", "m3u8", "mp4", "webm")

#: encoders a request may ask for by name (anything else could be an unvetted ffmpeg option)
VIDEO_CODECS = ("libx264", "libx265", "mpeg4", "libvpx-vp9", "flv1")
AUDIO_CODECS = ("aac", "libmp3lame", "libopus", "mp3", "opus", "pcm_s16le")

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_INVOCATION_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_BITRATE_RE = re.compile(r"^[1-9][0-9]*(\.[0-9]+)?[kKmM]?$")


def validate_bucket_name(name: str) -> str:
    """S3 bucket naming rules: 3-63 chars of a-z, 0-9, '.', '-'; not an IP address."""
    if not _BUCKET_RE.match(name) or ".." in name or _IPV4_RE.match(name):
        raise ValueError(
            f"invalid bucket name {name!r}: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


def validate_output_dir(value: str) -> str:
    """A relative key prefix: no leading '/', no '..' segment, no control characters."""
    if _CONTROL_RE.search(value):
        raise ValueError("output_dir must not contain control characters")
    if value.startswith("/"):
        raise ValueError("output_dir must be a relative prefix (no leading '/')")
    segments = value.split("/")
    if any(segment in ("..", ".") for segment in segments):
        raise ValueError("output_dir must not contain '.' or '..' segments")
    return value.rstrip("/")


class EncodingOptions(BaseModel):
    """Optional knobs shared by job requests and trigger rules."""

    model_config = ConfigDict(extra="forbid")

    video_codec: Literal[VIDEO_CODECS] | None = Field(  # type: ignore[valid-type]
        None, description="video encoder; default: the format's own"
    )
    audio_codec: Literal[AUDIO_CODECS] | None = Field(  # type: ignore[valid-type]
        None, description="audio encoder; default: the format's own"
    )
    height: int | None = Field(None, ge=16, le=4320, description="scale to this height")
    video_bitrate: str | None = Field(None, description="e.g. '2M' or '800k'")
    audio_bitrate: str | None = Field(None, description="e.g. '128k'")
    crf: int | None = Field(None, ge=0, le=63, description="constant quality (x264/x265/vp9)")
    hls_segment_s: float | None = Field(None, gt=0.5, le=60, description="HLS segment length")
    copy_policy: Literal["auto", "never"] = Field(
        "auto", description="auto: stream-copy when the source codecs fit the container"
    )

    @field_validator("video_bitrate", "audio_bitrate")
    @classmethod
    def _bitrate(cls, value: str | None) -> str | None:
        if value is not None and not _BITRATE_RE.match(value):
            raise ValueError(f"invalid bitrate {value!r}: use a number with k or M, e.g. '800k'")
        return value

    def encoding_options(self) -> EncodingOptions:
        """Just the encoding knobs of this object (drops request or rule fields)."""
        return EncodingOptions(
            **{name: getattr(self, name) for name in EncodingOptions.model_fields}
        )


def normalize_formats(values: list[str]) -> list[str]:
    """Lower-case, check and de-duplicate (keeping order) a list of format names."""
    result: list[str] = []
    for raw in values:
        fmt = raw.strip().lower().lstrip(".")
        if fmt not in FORMATS:
            raise ValueError(f"unsupported format {raw!r}: choose from {', '.join(FORMATS)}")
        if fmt not in result:
            result.append(fmt)
    if not result:
        raise ValueError("at least one output format is required")
    return result


class JobRequest(EncodingOptions):
    """The job request (SPEC §3). Unknown fields are rejected."""

    bucket: str
    object: str = Field(description="the source key")
    output_dir: str = ""
    dst_format: str | None = None
    dst_formats: list[str] | None = None
    output_bucket: str | None = None
    invocation_id: str | None = None
    on_success: str | None = Field(None, description="overrides the deployment's destination")
    on_failure: str | None = Field(None, description="overrides the deployment's destination")

    @field_validator("bucket", "output_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        return None if value is None else validate_bucket_name(value)

    @field_validator("object")
    @classmethod
    def _object(cls, value: str) -> str:
        if not value or len(value.encode()) > 1024:
            raise ValueError("object key must be 1-1024 bytes of UTF-8")
        if "\x00" in value:
            raise ValueError("object key must not contain NUL")
        if value.endswith("/") or value.rsplit("/", 1)[-1] in ("", ".", ".."):
            raise ValueError(f"object key {value!r} does not name a file")
        return value

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        return validate_output_dir(value)

    @field_validator("invocation_id")
    @classmethod
    def _invocation_id(cls, value: str | None) -> str | None:
        if value is not None and not _INVOCATION_ID_RE.match(value):
            raise ValueError(
                "invocation_id must match [A-Za-z_][A-Za-z0-9_-]{0,127} "
                "(a letter or '_' first, then letters, digits, '_' or '-')"
            )
        return value

    @model_validator(mode="after")
    def _formats(self) -> JobRequest:
        if self.dst_format is None and not self.dst_formats:
            raise ValueError("give dst_format or dst_formats")
        combined = ([self.dst_format] if self.dst_format else []) + list(self.dst_formats or [])
        normalized = normalize_formats(combined)
        if self.dst_format is not None:
            self.dst_format = normalized[0]
        if self.dst_formats is not None:
            self.dst_formats = normalize_formats(self.dst_formats)
        # an output written over its own source would destroy the user's original
        # (and a failed attempt's cleanup would delete it)
        if self.target_bucket == self.bucket:
            for fmt in normalized:
                key = self.output_key(f"{self.stem}.{fmt}")
                if key == self.object:
                    raise ValueError(
                        f"output {key!r} would overwrite the source object: "
                        "choose another output_dir or output_bucket"
                    )
        return self

    @property
    def formats(self) -> list[str]:
        """Every requested format, in order, without duplicates."""
        combined = ([self.dst_format] if self.dst_format else []) + list(self.dst_formats or [])
        return normalize_formats(combined)

    @property
    def stem(self) -> str:
        """The source file name without its extension: the outputs' base name."""
        name = self.object.rsplit("/", 1)[-1]
        stem, dot, _ext = name.rpartition(".")
        return stem if dot and stem else name

    @property
    def target_bucket(self) -> str:
        return self.output_bucket or self.bucket

    def output_key(self, file_name: str) -> str:
        """The object key of an output file: `{output_dir}/{file_name}`."""
        return f"{self.output_dir}/{file_name}" if self.output_dir else file_name


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"
    EXPIRED = "expired"
    INVALID = "invalid"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.EXPIRED, JobState.INVALID}
)
#: states from which `retry` may start the job again
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.STOPPED, JobState.EXPIRED})


class Progress(BaseModel):
    percent: float = 0.0
    fps: float | None = None
    speed: float | None = None
    eta_s: float | None = None
    phase: Literal["queued", "download", "transcode", "upload", "done"] = "queued"


class OutputObject(BaseModel):
    key: str
    size: int


class ErrorInfo(BaseModel):
    type: str
    message: str
    stderr_tail: str = ""


class JobEvent(BaseModel):
    at: datetime
    event: str
    detail: str = ""


class DestinationStatus(BaseModel):
    uri: str
    condition: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_error: str = ""
    delivered_at: datetime | None = None


class JobRecord(BaseModel):
    """A job's record (SPEC §4); its JSON form is what `--json` and the HTTP API show."""

    id: str
    invocation_id: str | None = None
    state: JobState = JobState.QUEUED
    request: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    worker: str | None = None
    progress: Progress = Field(default_factory=Progress)
    outputs: list[OutputObject] = Field(default_factory=list)
    commands: list[list[str]] = Field(default_factory=list)
    error: ErrorInfo | None = None
    events: list[JobEvent] = Field(default_factory=list)
    destinations: list[DestinationStatus] = Field(default_factory=list)
