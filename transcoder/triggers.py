"""Object-upload triggers: rules that turn S3/MinIO bucket-notification events into job requests.

Pure functions, no I/O besides reading the rules file: the webhook (`transcoder.api`) parses
the event with `parse_event`, asks `plan_jobs` what to submit, and submits it.

Loop guard: every key the service writes is `{output_dir}/{file}` (outputs and HLS segments),
so an event is ignored when its key lies where some rule writes outputs in that bucket
(`is_service_output_key`), or when the object carries the metadata `x-amz-meta-transcoder-job`
that workers set on their uploads: in the event's `userMetadata` (MinIO copies it there) or,
checked by the webhook before it submits, on the object itself (`stat_object`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from transcoder.errors import RequestError
from transcoder.models import (
    EncodingOptions,
    JobRequest,
    normalize_formats,
    validate_bucket_name,
    validate_output_dir,
)
from transcoder.storage import UPLOAD_TEMP_DIR

logger = logging.getLogger(__name__)

#: user metadata that workers put on every object they upload (loop guard, see module doc)
OUTPUT_METADATA_KEY = "x-amz-meta-transcoder-job"
#: MinIO files these under s3:ObjectCreated:* although the object's content did not change
METADATA_ONLY_EVENTS = frozenset({"PutRetention", "PutLegalHold", "PutTagging", "DeleteTagging"})
#: the placeholders an `output_dir` template may use
TEMPLATE_FIELDS = frozenset({"stem", "dir"})


class TriggerRule(EncodingOptions):
    """One rule of the triggers file: which uploads start a job, and what the job does."""

    model_config = ConfigDict(extra="forbid")

    bucket: str
    prefix: str = ""
    suffix: str = ""
    dst_formats: list[str] = Field(min_length=1)
    output_dir: str = Field(description="template; may use {stem} and {dir}")
    output_bucket: str | None = None

    @field_validator("bucket", "output_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        return None if value is None else validate_bucket_name(value)

    @field_validator("dst_formats", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> Any:
        if isinstance(value, str):  # "mp4,webm" is accepted as a shorthand
            value = value.split(",")
        return normalize_formats(list(value)) if isinstance(value, list) else value

    @field_validator("output_dir")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"output_dir template {value!r}: {exc}") from None
        for _literal, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS or spec or conversion:
                raise ValueError(
                    f"output_dir template {value!r}: only {{stem}} and {{dir}} may be used"
                )
        # the fixed parts must already be a valid prefix
        validate_output_dir(value.replace("{stem}", "x").replace("{dir}", "x"))
        return value

    @property
    def target_bucket(self) -> str:
        return self.output_bucket or self.bucket

    def matches(self, bucket: str, key: str) -> bool:
        """True when an upload of `key` into `bucket` falls under this rule (S3 filter rules)."""
        return bucket == self.bucket and key.startswith(self.prefix) and key.endswith(self.suffix)

    def render_output_dir(self, key: str) -> str:
        """The output prefix for source `key`: the template with {stem} and {dir} filled in."""
        directory, _, name = key.rpartition("/")
        stem, dot, _ext = name.rpartition(".")
        if not (dot and stem):
            stem = name
        rendered = self.output_dir.format(stem=stem, dir=directory)
        # an empty {dir} must not leave a leading or doubled '/'
        return validate_output_dir("/".join(part for part in rendered.split("/") if part))

    def output_key_pattern(self) -> re.Pattern[str]:
        """Regex matching every key this rule's jobs can write (`{output_dir}/{stem}.{ext}`).

        HLS writes segments beside its playlist, so an m3u8 rule claims any file name there.
        """
        pattern = ""
        for segment in self.output_dir.split("/"):
            if not segment:
                continue
            if segment == "{dir}":
                pattern += "(?:.+/)?"  # zero or more directories
                continue
            for literal, name, _spec, _conversion in string.Formatter().parse(segment):
                pattern += re.escape(literal)
                if name == "stem":
                    pattern += "[^/]*"
                elif name == "dir":
                    pattern += ".*"
            pattern += "/"
        if "m3u8" in self.dst_formats:
            file_pattern = "[^/]+"
        else:
            file_pattern = "[^/]*\\.(?:" + "|".join(map(re.escape, self.dst_formats)) + ")"
        return re.compile(pattern + file_pattern, re.DOTALL)

    def fingerprint(self) -> str:
        """A stable digest of the rule's content (part of the invocation id it derives)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


_RULES_ADAPTER = TypeAdapter(list[TriggerRule])


class TriggerRulesError(ValueError):
    """The triggers file cannot be read or does not hold a valid list of rules."""


def parse_rules(data: Any, *, source: str = "triggers") -> list[TriggerRule]:
    """Validate a decoded rules document: a list of rule objects (or `{"rules": [...]}`)."""
    if isinstance(data, Mapping) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        raise TriggerRulesError(f"{source}: expected a list of rules, got {type(data).__name__}")
    try:
        return _RULES_ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"rule {'.'.join(str(part) for part in error['loc'])}: "
            f"{error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise TriggerRulesError(f"{source}: {problems}") from None


def load_rules(path: Path) -> list[TriggerRule]:
    """Read and validate a YAML or JSON rules file (JSON is valid YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TriggerRulesError(f"cannot read triggers file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TriggerRulesError(f"{path}: not valid YAML/JSON: {exc}") from None
    return parse_rules([] if data is None else data, source=str(path))


class RulesCache:
    """Rules of one file, re-read when the file changes (edits apply without a restart)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._rules: list[TriggerRule] = []

    def get(self) -> list[TriggerRule]:
        """The current rules; `TriggerRulesError` if the file is unreadable or invalid."""
        if self.path is None:
            return []
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise TriggerRulesError(
                f"cannot read triggers file {self.path}: {exc.strerror}"
            ) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._rules = load_rules(self.path)
            self._stamp = stamp
        return self._rules


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectEvent:
    """One record of a bucket notification, decoded."""

    event_name: str
    bucket: str
    key: str
    etag: str = ""
    sequencer: str = ""
    version_id: str = ""
    size: int | None = None
    event_time: str = ""
    #: user metadata as the event carries it (MinIO does; AWS does not: None)
    user_metadata: Mapping[str, str] | None = None

    @property
    def is_create(self) -> bool:
        """`s3:ObjectCreated:*` (MinIO) or `ObjectCreated:*` (AWS), multipart completions too;
        not MinIO's metadata-only "created" events (tagging, retention, legal hold)."""
        kind, _, detail = self.event_name.removeprefix("s3:").partition(":")
        return kind == "ObjectCreated" and detail not in METADATA_ONLY_EVENTS

    @property
    def identity(self) -> str:
        """What makes a delivery unique: the eTag, else the sequencer, version or time."""
        return self.etag or self.sequencer or self.version_id or self.event_time

    def written_by_service(self) -> bool | None:
        """True/False from the event's user metadata; None when the event carries none."""
        if self.user_metadata is None:
            return None
        return has_output_metadata(self.user_metadata)


def has_output_metadata(metadata: Mapping[str, Any]) -> bool:
    """True if object metadata (event or `stat_object` headers) marks a service output."""
    short = OUTPUT_METADATA_KEY.removeprefix("x-amz-meta-")
    return any(str(name).lower() in (OUTPUT_METADATA_KEY, short) for name in metadata)


class EventFormatError(RequestError):
    """The webhook body is not a bucket notification."""


def parse_event(body: Any) -> list[ObjectEvent]:
    """Decode a MinIO/S3 notification body (`{"Records": [...]}`) into its object events.

    Keys arrive URL-encoded with '+' for a space and are decoded with `unquote_plus`.
    """
    if not isinstance(body, Mapping):
        raise EventFormatError("expected a JSON object with a 'Records' list")
    records = body.get("Records")
    if records is None:
        return []  # e.g. a test delivery: nothing to do
    if not isinstance(records, list):
        raise EventFormatError("'Records' must be a list")
    events = []
    for index, record in enumerate(records):
        try:
            s3 = record["s3"]
            obj = s3["object"]
            raw_key = obj["key"]
            bucket = s3["bucket"]["name"]
            if not isinstance(raw_key, str) or not isinstance(bucket, str):
                raise TypeError
        except (KeyError, TypeError):
            raise EventFormatError(
                f"Records[{index}] lacks s3.bucket.name or s3.object.key"
            ) from None
        metadata = obj.get("userMetadata")
        size = obj.get("size")
        events.append(
            ObjectEvent(
                event_name=str(record.get("eventName", "")),
                bucket=bucket,
                key=urllib.parse.unquote_plus(raw_key),
                etag=str(obj.get("eTag") or obj.get("etag") or "").strip('"'),
                sequencer=str(obj.get("sequencer") or ""),
                version_id=str(obj.get("versionId") or ""),
                size=size if isinstance(size, int) else None,
                event_time=str(record.get("eventTime") or ""),
                user_metadata=dict(metadata) if isinstance(metadata, Mapping) else None,
            )
        )
    return events


# --- planning ---------------------------------------------------------------------------------


def invocation_id(event: ObjectEvent, rule: TriggerRule) -> str:
    """Deterministic job id for (bucket, key, eTag-or-sequencer, rule): a redelivery dedups."""
    material = "\x00".join((event.bucket, event.key, event.identity, rule.fingerprint()))
    return "s3_" + hashlib.sha256(material.encode()).hexdigest()[:40]


def is_service_output_key(bucket: str, key: str, rules: Iterable[TriggerRule]) -> bool:
    """True if `key` in `bucket` lies where some rule's jobs write their outputs."""
    return any(
        rule.target_bucket == bucket and rule.output_key_pattern().fullmatch(key) for rule in rules
    )


@dataclass
class Decision:
    """What the webhook does with one event record: submit `requests`, or why not."""

    event: ObjectEvent
    requests: list[JobRequest] = field(default_factory=list)
    ignored: str = ""


def plan_jobs(event: ObjectEvent, rules: list[TriggerRule]) -> Decision:
    """Job requests for one event: one per matching rule, none for non-create or own outputs."""
    if not event.is_create:
        return Decision(event, ignored=f"not an object-created event ({event.event_name})")
    matching = [rule for rule in rules if rule.matches(event.bucket, event.key)]
    if not matching:
        return Decision(event, ignored="no rule matches")
    if event.written_by_service():
        return Decision(event, ignored="object was written by the service")
    if UPLOAD_TEMP_DIR in event.key.split("/"):
        # an attempt's upload before it is copied into place (gone soon, or never complete)
        return Decision(event, ignored="object was written by the service")
    if is_service_output_key(event.bucket, event.key, rules):
        return Decision(event, ignored="key lies under an output directory of a rule")
    decision = Decision(event)
    problems = []
    for rule in matching:
        try:
            request = JobRequest(
                bucket=event.bucket,
                object=event.key,
                output_dir=rule.render_output_dir(event.key),
                dst_formats=rule.dst_formats,
                output_bucket=rule.output_bucket,
                invocation_id=invocation_id(event, rule),
                **rule.encoding_options().model_dump(exclude_unset=True),
            )
        except (ValidationError, ValueError) as exc:
            problems.append(_short_error(exc))
            continue
        decision.requests.append(request)
    if not decision.requests:
        decision.ignored = "invalid request from rule: " + "; ".join(problems)
    return decision


def _short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            error["msg"].removeprefix("Value error, ") for error in exc.errors(include_url=False)
        )
    return str(exc)


def needs_metadata_check(decision: Decision) -> bool:
    """True when jobs would be made: the object's own metadata has the last word.

    An event's `userMetadata` is only a copy (and absent in AWS-form events), so before
    submitting, the webhook looks at the object itself for the workers' marker.
    """
    return bool(decision.requests)
