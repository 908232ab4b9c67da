"""An embedded Redis-protocol server (fakeredis over TCP) for the demo and trials.

It lets ``make demo`` run on a machine with no Redis: the server lives in
threads of the process that starts it, and other processes (workers,
frontends) connect to it by URL like to any Redis. Not for production: it is
in-memory, single-process and slower than Redis.
"""

from __future__ import annotations

import select
import threading
from types import TracebackType

import redis
from fakeredis import TcpFakeServer
from fakeredis._clients._tcp_server import TCPFakeRequestHandler
from fakeredis._commands import command
from fakeredis._socket._fakesocket import FakeSocket

from bus.parsing import text

# Two gaps of fakeredis 2.40's TCP server are filled here, both only for the
# demo's embedded mode: it has no INFO (arq workers log INFO at start-up), and
# it closes the connection after any error reply, which breaks redis-py's
# EVALSHA -> NOSCRIPT -> SCRIPT LOAD retry (and any client after one bad command).

_INFO = (
    b"# Server\r\nredis_version:7.4.0\r\nredis_mode:standalone\r\nos:fakeredis\r\n"
    b"# Clients\r\nconnected_clients:1\r\n"
    b"# Memory\r\nused_memory:0\r\nused_memory_human:0B\r\n"
)


@command((), (bytes,), name="info")
def info(self: FakeSocket, *sections: bytes) -> bytes:
    """A minimal INFO: arq's workers log it at start-up and fakeredis has none."""
    return _INFO


# fakeredis dispatches a command to the FakeSocket method its signature names.
# The signature records the function's name, so the method must be called ``info``.
FakeSocket.info = info  # type: ignore[attr-defined]


class _RequestHandler(TCPFakeRequestHandler):
    """fakeredis' handler, except that an error reply keeps the connection open."""

    def handle(self) -> None:
        while not self.server._shutdown_event.is_set():
            try:
                if self.current_client.can_read():
                    self.writer.dump(self.current_client.read_response())
                    continue
                data = self.rfile.readline()
                if data == b"":
                    readable, _, _ = select.select([self.connection], [], [], 0.01)
                    if not readable:
                        continue
                    data = self.rfile.readline()
                    if data == b"":
                        break
                self.current_client.get_socket().sendall(data)
            except redis.ResponseError as exc:
                self.writer.dump(exc)  # an error reply, like Redis: the client carries on
            except Exception as exc:
                self.writer.dump(exc)
                break


class EmbeddedRedis:
    """``with EmbeddedRedis() as url:`` serves Redis on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = TcpFakeServer((host, port), server_version=(7, 4))
        self._server.RequestHandlerClass = _RequestHandler
        # Client threads may sit in blocking reads; they must not keep the process alive.
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="lcbus-embedded-redis", daemon=True
        )
        bound_host, bound_port = self._server.server_address[:2]
        host_text = text(bound_host)
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
