"""The `transcoder` command line: thin shells over the library."""

from __future__ import annotations

import importlib

from transcoder.cli.app import app

# each module adds its commands to `app` when imported
for _module in ("run", "jobs", "serve"):
    try:
        importlib.import_module(f"transcoder.cli.{_module}")
    except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is missing
        if exc.name != f"transcoder.cli.{_module}":
            raise


def main() -> None:
    """Entry point of the `transcoder` console script."""
    app()
