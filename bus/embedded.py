"""An embedded Redis-protocol server (fakeredis over TCP) for the demo and trials.

It lets ``make demo`` run on a machine with no Redis: the server lives in
threads of the process that starts it, and other processes (workers,
frontends) connect to it by URL like to any Redis. Not for production: it is
in-memory, single-process and slower than Redis.
"""

from __future__ import annotations

import threading
from types import TracebackType

from fakeredis import TcpFakeServer


class EmbeddedRedis:
    """``with EmbeddedRedis() as url:`` serves Redis on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = TcpFakeServer((host, port), server_version=(7, 4))
        # Client threads may sit in blocking reads; they must not keep the process alive.
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lcbus-embedded-redis", daemon=True
        )
        bound_host, bound_port = self._server.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        self.url = f"redis://{host_text}:{bound_port}/0"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
