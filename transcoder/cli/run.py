"""`transcoder run`: transcode local files now, in-process, with no servers.

Exit codes: 0 every input succeeded, 1 a media or ffmpeg failure, 2 a usage error,
130 interrupted (ffmpeg killed, nothing partial left).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from transcoder.cli.app import app
from transcoder.engine import ProgressEvent, TranscodeResult, fit_stem, transcode
from transcoder.errors import RequestError, TranscoderError
from transcoder.models import EncodingOptions, normalize_formats

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _fail_usage(console: Console, message: str) -> typer.Exit:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - loop always returns


def _one_line(source: Path, error: TranscoderError) -> str:
    """`480P.mp4: MediaError: not a media file (...)` without repeating the file name."""
    message = error.message.splitlines()[0] if error.message else ""
    message = message.removeprefix(f"{source.name}: ")
    return f"{source.name}: {error.error_type}: {message}"


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so SIGTERM cleans up exactly like Ctrl-C


def _summary(results: list[tuple[Path, TranscodeResult]]) -> Table:
    table = Table(title="transcoder run")
    for column in ("input", "format", "video", "audio", "size", "duration", "time"):
        table.add_column(
            column, justify="right" if column in ("size", "duration", "time") else "left"
        )
    for source, result in results:
        for output in result.outputs:
            table.add_row(
                source.name,
                output.format,
                output.video or "-",
                output.audio or "-",
                _size(sum(path.stat().st_size for path in output.paths)),
                f"{result.media.duration_s:.2f} s" if result.media.duration_s else "unknown",
                f"{result.elapsed_s:.2f} s",
            )
    return table


@app.command("run")
def run_command(
    inputs: Annotated[list[Path], typer.Argument(help="local source files", show_default=False)],
    to: Annotated[
        str, typer.Option("--to", help="formats, comma-separated: mov,flv,avi,m3u8,mp4,webm")
    ],
    out: Annotated[Path, typer.Option("--out", help="output directory (created if missing)")],
    video_codec: Annotated[str | None, typer.Option(help="video encoder")] = None,
    audio_codec: Annotated[str | None, typer.Option(help="audio encoder")] = None,
    height: Annotated[int | None, typer.Option(help="scale down to this height")] = None,
    video_bitrate: Annotated[str | None, typer.Option(help="e.g. 2M")] = None,
    audio_bitrate: Annotated[str | None, typer.Option(help="e.g. 128k")] = None,
    crf: Annotated[int | None, typer.Option(help="constant quality (x264/x265/vp9)")] = None,
    hls_segment_s: Annotated[float | None, typer.Option(help="HLS segment seconds")] = None,
    copy_policy: Annotated[str, typer.Option(help="auto: copy streams that fit; never")] = "auto",
) -> None:
    """Transcode local files into every format with one ffmpeg per input."""
    errors = Console(stderr=True)
    try:
        formats = normalize_formats(to.split(","))
    except ValueError as exc:
        raise _fail_usage(errors, str(exc)) from None
    values: dict[str, Any] = {
        "video_codec": video_codec,
        "audio_codec": audio_codec,
        "height": height,
        "video_bitrate": video_bitrate,
        "audio_bitrate": audio_bitrate,
        "crf": crf,
        "hls_segment_s": hls_segment_s,
        "copy_policy": copy_policy,
    }
    try:
        options = EncodingOptions(
            **{key: value for key, value in values.items() if value is not None}
        )
    except ValidationError as exc:
        reasons = "; ".join(
            f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise _fail_usage(errors, reasons) from None
    for source in inputs:
        try:
            found = source.is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise _fail_usage(errors, f"{source}: {exc.strerror}") from None
        if not found:
            raise _fail_usage(errors, f"{source}: no such file")
    # a source name near the 255-byte limit would leave no room for a longer extension
    stems = [fit_stem(source.stem) for source in inputs]
    if len(set(stems)) != len(stems):
        clash = next(stem for stem in stems if stems.count(stem) > 1)
        raise _fail_usage(errors, f"several inputs are named {clash!r}: their outputs would clash")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail_usage(
            errors, f"cannot create the output directory {out}: {exc.strerror}"
        ) from None
    signal.signal(signal.SIGTERM, _raise_interrupt)
    results: list[tuple[Path, TranscodeResult]] = []
    failed = False
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[speed]}"),
        TimeRemainingColumn(),
        console=errors,
        # a bar is for people watching a terminal; in a log or a pipe it would add a second
        # line to a failure's one-line reason
        disable=not errors.is_terminal,
    )
    try:
        with progress:
            for source in inputs:
                task = progress.add_task(escape(source.name), total=100, speed="")

                def report(event: ProgressEvent, task: Any = task) -> None:
                    speed = f"{event.speed:.1f}x" if event.speed else ""
                    progress.update(task, completed=event.percent, speed=speed)

                try:
                    result = transcode(
                        source,
                        out,
                        stem=fit_stem(source.stem),
                        formats=formats,
                        options=options,
                        on_progress=report,
                    )
                except RequestError as exc:
                    progress.stop()
                    raise _fail_usage(errors, _one_line(source, exc)) from None
                except TranscoderError as exc:
                    failed = True
                    progress.update(task, description=escape(f"{source.name} (failed)"))
                    progress.console.print(
                        f"error: {_one_line(source, exc)}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                    continue
                results.append((source, result))
    except KeyboardInterrupt:
        message = "error: interrupted; ffmpeg stopped, no partial output kept"
        errors.print(message, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if results:
        Console(file=sys.stdout).print(_summary(results))
    raise typer.Exit(EXIT_FAILED if failed else 0)
