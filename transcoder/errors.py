"""The project's exception hierarchy.

Whether an error is worth retrying is a property of its type (`retryable`), never an `if`
scattered through the tasks. `error_type` is the stable name that records and envelopes carry.
"""

from __future__ import annotations


class TranscoderError(Exception):
    """Base of every error this project raises on purpose."""

    error_type = "TranscoderError"
    retryable = False
    #: the destination condition a job that ends with this error reports
    condition = "RetriesExhausted"

    def __init__(self, message: str, *, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        return self.message


class RequestError(TranscoderError):
    """The job request itself is invalid (bad field, unknown format, unsafe path)."""

    error_type = "RequestError"
    condition = "InvalidRequest"


class MediaError(TranscoderError):
    """The source is not usable media: empty, truncated, not media, hostile or too large."""

    error_type = "MediaError"


class UnsupportedMediaError(MediaError):
    """The source is media, but nothing we can transcode (no usable stream, unknown codec)."""

    error_type = "UnsupportedMediaError"


class SourceTooLargeError(MediaError):
    """The source exceeds a configured limit (bytes, pixels, duration)."""

    error_type = "SourceTooLargeError"


class FfmpegError(TranscoderError):
    """ffmpeg failed on a source that probed fine; carries the tail of its stderr."""

    error_type = "FfmpegError"


class StalledError(FfmpegError):
    """ffmpeg made no progress for longer than the stall timeout and was killed."""

    error_type = "StalledError"
    retryable = True


class TimeLimitError(TranscoderError):
    """The job ran longer than its wall-clock limit and was killed."""

    error_type = "TimeLimitError"


class CancelledError(TranscoderError):
    """The job was stopped by an operator."""

    error_type = "Cancelled"
    condition = "Stopped"


class StorageError(TranscoderError):
    """The object store could not be reached or failed; usually transient."""

    error_type = "StorageError"
    retryable = True


class ObjectNotFoundError(StorageError):
    """The source bucket or object does not exist; retrying cannot help."""

    error_type = "ObjectNotFound"
    retryable = False


class StorageAccessError(StorageError):
    """The object store refused our credentials or access; retrying cannot help."""

    error_type = "StorageAccessDenied"
    retryable = False


class InsufficientDiskError(TranscoderError):
    """The work directory has not enough free space for the source and its outputs."""

    error_type = "InsufficientDisk"
    retryable = True


class JobNotFoundError(TranscoderError):
    """No job with this id exists (or it aged out of retention)."""

    error_type = "JobNotFound"


class InvalidStateError(TranscoderError):
    """The operation does not apply to the job's current state (e.g. retry a running job)."""

    error_type = "InvalidState"


class InternalError(TranscoderError):
    """A bug: anything unexpected. Reported as `Unhandled`."""

    error_type = "InternalError"
