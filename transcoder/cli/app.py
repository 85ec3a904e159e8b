"""The `transcoder` Typer application; command modules register themselves on `app`."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="transcoder",
    help="FFmpeg video transcoding: local runs, jobs on the worker service, the HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
