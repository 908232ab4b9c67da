"""``lcbus serve``: run a streaming frontend process with uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

from bus.settings import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="run a streaming frontend (SSE and WebSocket)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from bus.frontend import create_app

    settings = Settings.from_env()
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, closes streams, runs the lifespan
    # shutdown (hub and Redis client closed), then exits.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws_ping_interval=settings.ping_interval_s,
        timeout_graceful_shutdown=5,
    )
    return 0
