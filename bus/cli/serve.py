"""``lcbus serve``: run a streaming frontend process with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import resource
from collections.abc import Iterator
from typing import Any

from bus.settings import Settings

log = logging.getLogger(__name__)

# Connections the kernel queues for accept: a burst of a thousand clients
# connecting at once fits (uvicorn's default is 2048, the kernel caps it at somaxconn).
BACKLOG = 4096
GC_YOUNG_THRESHOLD = 50_000
"""Allocations (less deallocations) between two collections of the youngest generation."""


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
    raise_open_files_limit()
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        ws_ping_interval=settings.ping_interval_s,
        timeout_graceful_shutdown=math.ceil(settings.drain_s),
        backlog=BACKLOG,
    )
    # Everything imported so far lives as long as the process: frozen, it is left
    # out of every garbage collection, which then only walks the clients' objects.
    gc.collect()
    gc.freeze()
    # Each stream allocates a few objects per event that refcounting frees; with
    # the default threshold (700) a collection ran every few milliseconds, and a
    # full one, walking every client's objects, twice in ten seconds of
    # bench.clients (tens to hundreds of ms each, the loop standing still).
    # At 50,000 the same run has three young collections and no full one.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 10)
    _draining_server(config).run()
    return 0


def raise_open_files_limit() -> None:
    """Every client holds a socket: lift the soft limit on open files to the hard one.

    The usual soft limit (1024) would refuse connections past a thousand clients.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.debug("open files limit: %s", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _draining_server(config: Any) -> Any:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, except that SIGTERM is a normal, successful stop.

        On SIGTERM/SIGINT uvicorn stops accepting, closes each WebSocket with
        1012, and waits up to ``drain_s`` while every SSE stream sends its
        ``reconnect`` frame and ends (``drain_on_shutdown`` sees the shutdown); then the
        lifespan closes the hub and the Redis client. uvicorn would then re-raise
        the signal, so the process would die by it; a drained frontend exits 0.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return DrainingServer(config)
