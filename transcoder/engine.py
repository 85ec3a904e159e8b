"""The library entry point: probe → plan → one ffmpeg → outputs moved into place.

Used by `transcoder run` and by the Celery task. Every output is written into a private
temporary directory inside `out_dir` and moved to its final name only when ffmpeg succeeded;
on any failure or cancellation nothing of the attempt remains.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transcoder.errors import (
    CancelledError,
    FfmpegError,
    InsufficientDiskError,
    InternalError,
    MediaError,
    RequestError,
    TranscoderError,
)
from transcoder.models import EncodingOptions
from transcoder.plan import OutputPlan, build_plan, segment_base_name
from transcoder.probe import MediaInfo, probe
from transcoder.runner import ProgressEvent, run_ffmpeg
from transcoder.settings import Settings, get_settings

__all__ = ["OutputFile", "ProgressEvent", "TranscodeResult", "fit_stem", "transcode"]


@dataclass
class OutputFile:
    """One produced format: its final local files (HLS: the segments first, playlist last)."""

    format: str
    paths: list[Path]
    video: str | None  # "copy" | "encode" | None (no video)
    audio: str | None


@dataclass
class TranscodeResult:
    """Everything one `transcode` call produced."""

    outputs: list[OutputFile]
    commands: list[list[str]]
    media: MediaInfo
    elapsed_s: float


#: a file name may have 255 bytes; the longest output extension is ".webm" / ".m3u8"
MAX_STEM_BYTES = 250


def _check_stem(stem: str) -> None:
    if not stem or stem in (".", "..") or "/" in stem or "\x00" in stem:
        raise RequestError(f"invalid output name {stem!r}: it must be a plain file name")
    if len(os.fsencode(stem)) > MAX_STEM_BYTES:
        raise RequestError(
            f"output name too long: {len(os.fsencode(stem))} bytes, at most {MAX_STEM_BYTES}"
        )


def fit_stem(stem: str) -> str:
    """`stem` shortened (on a character boundary) so every output's file name fits."""
    while len(os.fsencode(stem)) > MAX_STEM_BYTES:
        stem = stem[:-1]
    return stem


def _segments(playlist: Path) -> list[Path]:
    """The segment files a finished playlist names (relative names, in order)."""
    names = [
        line.strip()
        for line in playlist.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [playlist.parent / name for name in names]


def _produced_files(output: OutputPlan) -> list[Path]:
    """The temporary files of one output, checked: present and not empty."""
    files = [output.temp_path]
    if output.temp_path.suffix == ".m3u8" and output.temp_path.is_file():
        text = output.temp_path.read_text(encoding="utf-8")
        if "#EXT-X-ENDLIST" not in text:
            raise FfmpegError(f"{output.format}: the playlist is incomplete (no #EXT-X-ENDLIST)")
        files = [*_segments(output.temp_path), output.temp_path]
    for path in files:
        if not path.is_file() or path.stat().st_size == 0:
            raise FfmpegError(f"{output.format}: ffmpeg wrote no data to {path.name}")
    return files


def _move_into_place(
    outputs: list[OutputPlan], out_dir: Path, moved: list[Path]
) -> list[OutputFile]:
    """Rename every temporary file to its final name; the playlist after its segments."""
    results = []
    for output in outputs:
        finals = []
        for path in _produced_files(output):
            final = output.final_path if path == output.temp_path else out_dir / path.name
            os.replace(path, final)  # same file system: atomic
            moved.append(final)
            finals.append(final)
        results.append(OutputFile(output.format, finals, output.video, output.audio))
    return results


def transcode(
    source: Path,
    out_dir: Path,
    *,
    stem: str,
    formats: Sequence[str],
    options: EncodingOptions | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    on_command: Callable[[list[str]], None] | None = None,
    cancel: threading.Event | None = None,
    time_limit_s: float | None = None,
) -> TranscodeResult:
    """Convert `source` into every format as `out_dir/{stem}.{ext}` with one ffmpeg process.

    Raises only TranscoderError subclasses; on failure or cancel `out_dir` keeps nothing of
    the attempt. The last progress event of a success is 100 %. `on_command` gets the ffmpeg
    command line just before ffmpeg starts, so a failed job's record can show it too.
    """
    started = time.monotonic()
    settings = settings or get_settings()
    options = options or EncodingOptions.model_validate({})
    temp_dir: Path | None = None
    moved: list[Path] = []
    try:
        _check_stem(stem)
        if not formats:
            raise RequestError("at least one output format is required")
        if not source.exists():
            raise MediaError(f"{source.name}: the source file does not exist")
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled before ffmpeg started")
        media = probe(source, settings, cancel)
        out_dir.mkdir(parents=True, exist_ok=True)
        free_bytes = shutil.disk_usage(out_dir).free
        if free_bytes < settings.min_free_disk_bytes:
            raise InsufficientDiskError(
                f"only {free_bytes // 2**20} MiB free in {out_dir}; "
                f"need at least {settings.min_free_disk_bytes // 2**20} MiB"
            )
        out_dir = out_dir.resolve()
        prefix = f".{segment_base_name(stem)[:40]}.part-"
        temp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
        plan = build_plan(
            media, formats, options, settings, temp_dir=temp_dir, out_dir=out_dir, stem=stem
        )
        if on_command is not None:
            on_command(list(plan.command))
        last: ProgressEvent | None = None
        events = run_ffmpeg(
            plan.command,
            duration_s=plan.duration_s,
            stall_timeout_s=settings.stall_timeout_s,
            cancel=cancel,
            time_limit_s=time_limit_s,
            on_log=on_log,
            cwd=plan.work_dir,
            watch_dir=plan.work_dir,
        )
        # closing(): ffmpeg is killed even when on_progress raises mid-run
        with contextlib.closing(events):
            for event in events:
                last = event
                if on_progress is not None:
                    on_progress(event)
        outputs = _move_into_place(plan.outputs, out_dir, moved)
        if on_progress is not None:
            fps = last.fps if last else None
            speed = last.speed if last else None
            on_progress(ProgressEvent(100.0, fps, speed, 0.0, plan.duration_s))
        return TranscodeResult(
            outputs=outputs,
            commands=[plan.command],
            media=media,
            elapsed_s=round(time.monotonic() - started, 3),
        )
    except BaseException as exc:
        for path in moved:  # a half-moved result is a partial output too
            path.unlink(missing_ok=True)
        if isinstance(exc, TranscoderError) or not isinstance(exc, Exception):
            raise  # ours, or KeyboardInterrupt/SystemExit: cleaned up, passed on
        raise InternalError(f"internal error: {type(exc).__name__}: {exc}") from exc
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
