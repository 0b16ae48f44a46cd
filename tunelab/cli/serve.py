"""`tunelab serve`: the OpenAI-compatible gateway."""

from __future__ import annotations

import typer

from tunelab.cli._common import workspace


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Serve deployments behind an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from tunelab.server.app import serve as run_server

    run_server(workspace(), host=host, port=port)
