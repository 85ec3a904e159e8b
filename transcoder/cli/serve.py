"""`transcoder api`: the HTTP API and the object-upload webhook (uvicorn)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from transcoder.cli.app import app


@app.command("api")
def api_command(
    host: Annotated[
        str | None,
        typer.Option(help="address to bind (default: TRANSCODER_API_HOST, else 127.0.0.1)"),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="port (default: TRANSCODER_API_PORT, else 8080)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the HTTP API (/jobs, /hooks/s3, /healthz, /metrics; OpenAPI at /docs)."""
    import uvicorn

    from transcoder.api import create_app
    from transcoder.settings import get_settings
    from transcoder.triggers import RulesCache, TriggerRulesError

    settings = get_settings()
    try:  # a broken rules file is an operator error: say so now, not at the first upload
        rules = RulesCache(settings.triggers).get()
    except TriggerRulesError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("transcoder.api")
    if settings.webhook_token is None:
        log.warning("TRANSCODER_WEBHOOK_TOKEN is not set: POST /hooks/s3 refuses every call")
    log.info("%d trigger rules from %s", len(rules), settings.triggers or "(none)")
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_level=log_level.lower(),
        proxy_headers=False,
    )
