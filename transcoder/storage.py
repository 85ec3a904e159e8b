"""The S3/MinIO client wrapper: streaming download, multipart upload, server-side copy,
listing, removal.

Every minio/urllib3 error leaves here as a TranscoderError: a missing bucket or object is
permanent (ObjectNotFoundError), refused credentials are permanent (StorageAccessError),
anything else (connection refused, timeouts, 5xx) is a transient StorageError. Messages name
the endpoint, bucket and key, never the credentials.
"""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from transcoder.errors import (
    CancelledError,
    ObjectNotFoundError,
    SourceTooLargeError,
    StorageAccessError,
    StorageError,
    TranscoderError,
)
from transcoder.settings import Settings, get_settings

#: read the source in chunks of this size: memory stays flat whatever the object size
CHUNK_BYTES = 1024 * 1024
#: multipart part size for uploads; minio holds each part in memory while it sends it, so
#: parts stay small (memory is PART_BYTES x PARALLEL_PARTS) and grow only for huge files
#: (S3 allows 10,000 parts per object)
PART_BYTES = 8 * 1024 * 1024
PARALLEL_PARTS = 2
MAX_PARTS = 9000
#: metadata on every object the service writes, so upload triggers can ignore our outputs
#: the folder (under an output dir) where attempts upload before copying into place
UPLOAD_TEMP_DIR = ".transcoder-tmp"
WRITTEN_BY_METADATA = "transcoder-job"
#: metadata naming the attempt that wrote an object: cleanup removes only its own objects
ATTEMPT_METADATA = "transcoder-attempt"

_CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".flv": "video/x-flv",
    ".avi": "video/x-msvideo",
    ".webm": "video/webm",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def content_type(path: Path | str) -> str:
    """The Content-Type of an output file, by its extension (the format table decides)."""
    name = Path(path).name
    try:
        from transcoder.formats import content_type_for

        found = content_type_for(name)
        if found and found != "application/octet-stream":
            return found
    except (ImportError, KeyError, ValueError):
        pass
    suffix = Path(name).suffix.lower()
    guessed = mimetypes.guess_type(f"x{suffix}")[0]
    return _CONTENT_TYPES.get(suffix) or guessed or "application/octet-stream"


@dataclass
class ObjectInfo:
    key: str
    size: int


class _CancellableReader:
    """A file for minio's `put_object` whose read() raises CancelledError once `cancel` is set.

    minio reads each part before it sends it, so a stop takes effect between parts of a
    multipart upload (minio then aborts the multipart upload: no object appears). Caveat of
    minio 7.2: an aborted parallel upload leaves its two idle part threads waiting on their
    empty queue (a few KB each), so this costs a little only when a stop hits such an upload.
    """

    def __init__(
        self,
        file: BinaryIO,
        size: int,
        cancel: threading.Event | None,
        on_bytes: Callable[[int, int], None] | None,
    ) -> None:
        self._file, self._size, self._cancel, self._on_bytes = file, size, cancel, on_bytes
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise CancelledError("stopped during upload")
        data = self._file.read(size)
        self._done += len(data)
        if self._on_bytes is not None and data:
            self._on_bytes(self._done, self._size)
        return data


class Storage:
    """One MinIO client for the configured endpoint; thread-safe like minio.Minio itself."""

    def __init__(self, settings: Settings | None = None, *, retries: int = 2) -> None:
        self.settings = settings or get_settings()
        self.endpoint = self.settings.s3_endpoint
        # few transport-level retries: a longer outage becomes a StorageError, which the task
        # retries with backoff instead of blocking a worker slot for minutes
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=urllib3.Retry(
                total=retries, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)
            ),
            maxsize=10,
        )
        self.client = Minio(
            self.endpoint,
            access_key=self.settings.s3_access_key.get_secret_value(),
            secret_key=self.settings.s3_secret_key.get_secret_value(),
            secure=self.settings.s3_secure,
            region=self.settings.s3_region,
            http_client=http,
        )

    @contextmanager
    def _errors(self, action: str, bucket: str, key: str = "") -> Iterator[None]:
        where = f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"
        try:
            yield
        except TranscoderError:
            raise
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(f"{action} {where}: {exc.code} ({exc.message})") from None
            if exc.code in _ACCESS_CODES:
                raise StorageAccessError(f"{action} {where}: {exc.code}") from None
            raise StorageError(f"{action} {where}: {exc.code} ({exc.message})") from None
        except (ServerError, InvalidResponseError) as exc:
            status = getattr(exc, "status_code", "?")
            raise StorageError(f"{action} {where}: the object store answered {status}") from None
        except ValueError as exc:  # the minio client refuses a name (e.g. a '..' segment)
            raise ObjectNotFoundError(f"{action} {where}: key not addressable: {exc}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(
                f"{action} {where}: cannot reach the object store at {self.endpoint} "
                f"({type(exc).__name__})"
            ) from None

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        """Size of an object; ObjectNotFoundError if the bucket or object does not exist."""
        with self._errors("stat", bucket, key):
            found = self.client.stat_object(bucket, key)
        return ObjectInfo(key=key, size=int(found.size or 0))

    def download(
        self,
        bucket: str,
        key: str,
        destination: Path,
        *,
        on_bytes: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ObjectInfo:
        """Stream an object into `destination` chunk by chunk (never whole in memory).

        Checks the size against `max_source_bytes` first; `cancel` aborts between chunks."""
        info = self.stat(bucket, key)
        if info.size > self.settings.max_source_bytes:
            raise SourceTooLargeError(
                f"s3://{bucket}/{key} is {info.size} bytes; the limit is "
                f"{self.settings.max_source_bytes} (TRANSCODER_MAX_SOURCE_BYTES)"
            )
        done = 0
        with self._errors("download", bucket, key):
            response = self.client.get_object(bucket, key)
            try:
                with destination.open("wb") as sink:
                    # read1: whatever arrived, at most a chunk, so a stop (or the job's time
                    # limit) takes effect within moments even when the store trickles bytes
                    while chunk := response.read1(CHUNK_BYTES):
                        if cancel is not None and cancel.is_set():
                            raise CancelledError("stopped during download")
                        sink.write(chunk)
                        done += len(chunk)
                        if on_bytes:
                            on_bytes(done, info.size)
            finally:
                response.close()
                response.release_conn()
        if done != info.size:
            raise StorageError(f"download s3://{bucket}/{key}: got {done} of {info.size} bytes")
        return info

    def upload(
        self,
        bucket: str,
        key: str,
        source: Path,
        *,
        job_id: str = "",
        attempt: str = "",
        content_key: str | None = None,
        cancel: threading.Event | None = None,
        on_bytes: Callable[[int, int], None] | None = None,
    ) -> ObjectInfo:
        """Upload a file (multipart above one part) with its content type (by `content_key`,
        default `key`) and the service's metadata (`job_id`, `attempt`).

        `cancel` aborts between parts (CancelledError; no object is left); `on_bytes(done,
        total)` follows the bytes handed to the upload."""
        size = source.stat().st_size
        metadata = {WRITTEN_BY_METADATA: job_id or "yes"}
        if attempt:
            metadata[ATTEMPT_METADATA] = attempt
        part_bytes = max(PART_BYTES, -(-size // MAX_PARTS))
        with self._errors("upload", bucket, key), source.open("rb") as file:
            self.client.put_object(
                bucket,
                key,
                _CancellableReader(file, size, cancel, on_bytes),  # type: ignore[arg-type]
                size,
                content_type=content_type(content_key or key),
                metadata=metadata,  # type: ignore[arg-type]
                part_size=part_bytes,
                num_parallel_uploads=PARALLEL_PARTS,
            )
        return ObjectInfo(key=key, size=size)

    def copy(self, bucket: str, source_key: str, key: str, *, job_id: str, attempt: str) -> None:
        """Server-side copy of `source_key` to `key` in `bucket`, with the content type of
        `key` and the service's metadata. A source above 5 GiB is copied part by part
        (minio's compose_object, still server-side)."""
        metadata = {
            "Content-Type": content_type(key),
            WRITTEN_BY_METADATA: job_id or "yes",
            ATTEMPT_METADATA: attempt,
        }
        with self._errors("copy", bucket, key):
            self.client.copy_object(
                bucket,
                key,
                CopySource(bucket, source_key),
                metadata=metadata,  # type: ignore[arg-type]
                metadata_directive=REPLACE,
            )

    def written_by(self, bucket: str, key: str) -> tuple[str, str] | None:
        """(job id, attempt) from an object's service metadata; None if it has none or is gone."""
        try:
            with self._errors("stat", bucket, key):
                found = self.client.stat_object(bucket, key)
        except ObjectNotFoundError:
            return None
        metadata = {str(name).lower(): value for name, value in (found.metadata or {}).items()}
        job_id = metadata.get(f"x-amz-meta-{WRITTEN_BY_METADATA}")
        if job_id is None:
            return None
        return str(job_id), str(metadata.get(f"x-amz-meta-{ATTEMPT_METADATA}", ""))

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` (recursive)."""
        with self._errors("list", bucket, prefix):
            return [
                ObjectInfo(key=str(item.object_name), size=int(item.size or 0))
                for item in self.client.list_objects(bucket, prefix=prefix, recursive=True)
            ]

    def remove(self, bucket: str, object_keys: list[str]) -> None:
        """Remove objects one by one; a missing object is not an error."""
        for key in object_keys:
            with self._errors("remove", bucket, key):
                self.client.remove_object(bucket, key)

    def remove_many(self, bucket: str, object_keys: list[str]) -> None:
        """Remove objects in batched DeleteObjects requests; a missing object is not an error."""
        if not object_keys:
            return
        with self._errors("remove", bucket, object_keys[0]):
            errors = list(
                self.client.remove_objects(bucket, (DeleteObject(key) for key in object_keys))
            )
        failed = [error for error in errors if error.code not in _NOT_FOUND_CODES]
        if failed:
            raise StorageError(
                f"remove s3://{bucket}/{failed[0].name}: {failed[0].code} "
                f"({len(failed)} object(s) not removed)"
            )

    def remove_prefix(self, bucket: str, prefix: str) -> int:
        """Remove every object under `prefix`; returns how many were removed."""
        found = self.list_objects(bucket, prefix)
        self.remove_many(bucket, [item.key for item in found])
        return len(found)
