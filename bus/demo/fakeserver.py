"""fakeredis served over TCP, with the gaps that matter to the bus filled.

:class:`FakeRedisServer` serves fakeredis' in-memory Redis on a TCP port, from
threads of the process that runs it (``bus.demo.embedded`` runs it in a
process of its own for the demo). Not for production: it is in-memory and
slower than Redis.

fakeredis 2.40's own TCP server is replaced here by a handler of ours (one
thread per connection, as there), whose connections keep their command state
in a :class:`~bus.demo.fakesocket.BusSocket` (stream reads that really block),
because of three more gaps:

- a message pushed to a connection (pub/sub, from another connection's
  ``PUBLISH``) waited for the handler's next 10 ms poll; here it wakes the
  handler at once, and an idle connection costs no CPU;
- replies went out one write each, with Nagle's algorithm on, so the second
  reply of a pipeline could wait for the client's delayed ACK (about 40 ms);
  here every reply ready is sent in one write, with ``TCP_NODELAY``;
- an error reply closed the connection, which breaks redis-py's
  ``EVALSHA`` -> ``NOSCRIPT`` -> ``SCRIPT LOAD`` retry; here the client carries on.
"""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import threading
from typing import Any

import redis
from fakeredis import TcpFakeServer
from fakeredis._clients._sync import FakeRedisConnection
from fakeredis._clients._tcp_server import encode_reply
from fakeredis._socket._fakesocket import FakeSocket

from bus.demo.fakesocket import BusSocket
from bus.parsing import text

IDLE_WAIT_S = 1.0
"""How long an idle handler sleeps before it looks whether the server is stopping
(a stop wakes every handler at once; this only bounds a missed wake-up)."""
READ_SIZE = 256 * 1024

# The RESP version every connection starts in, as on a fresh connection to Redis
# (fakeredis' own handler does the same); a client's HELLO switches it.
_START_IN_RESP2: dict[str, Any] = {"protocol": 2}


class _Connection(FakeRedisConnection):
    def _connect(self) -> FakeSocket:
        assert self._server is not None  # always given: the server's own fakeredis
        return BusSocket(
            self._server,
            client_class=self._client_class,
            db=self.db,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
        )


class _RequestHandler(socketserver.BaseRequestHandler):
    """One client connection: bytes in to fakeredis' parser, replies out in one write.

    The commands of one read run in order on this thread, so the replies to the
    commands a pipeline sent before a blocking one go out when it returns (Redis
    sends them first); the bus's clients read a pipeline's replies all at once.
    """

    server: FakeRedisServer

    def setup(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Other threads (a PUBLISH, a stop) wake this one through a socket pair; the
        # lock keeps a wake-up from writing to a closed (maybe reused) descriptor.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._wake_lock = threading.Lock()
        self.client = _Connection(
            server=self.server.fake_server,
            client_info={
                "laddr": sock.getsockname(),
                "addr": sock.getpeername(),
                "fd": sock.fileno(),
            },
            **_START_IN_RESP2,
        )
        self.fake: BusSocket = self.client.get_socket()  # type: ignore[assignment]
        self.fake.owner = threading.get_ident()
        self.fake.wake = self.wake
        self.server.handlers.add(self)

    def wake(self) -> None:
        # OSError: full (a wake-up is pending anyway) or closed (the client left).
        with self._wake_lock, contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def handle(self) -> None:
        sock: socket.socket = self.request
        while not self.server.stopping.is_set():
            if not self._send_replies():
                return
            readable, _, _ = select.select([sock, self._wake_read], [], [], self.server.idle_wait_s)
            if self._wake_read in readable:
                self._drain_wakes()
            if sock not in readable:
                continue
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            if not data:
                return  # the client closed the connection
            try:
                # Runs every complete command in data; a blocking one waits in here.
                self.fake.sendall(data)
            except redis.ConnectionError:
                return  # CLIENT KILL
            except Exception as exc:
                # The parser cannot go on (a malformed request): say so and close, like Redis.
                self._send_replies()
                self._send(encode_reply(exc, self._protocol()))
                return

    def _send_replies(self) -> bool:
        """Write every queued reply in one ``send``; False once the client is gone."""
        out: list[bytes] = []
        while self.client.can_read():
            try:
                value: Any = self.client.read_response()
            except redis.ResponseError as exc:
                value = exc  # an error reply, like Redis: the client carries on
            except redis.ConnectionError:
                return False
            out.append(encode_reply(value, self._protocol()))
        return not out or self._send(b"".join(out))

    def _send(self, data: bytes) -> bool:
        try:
            self.request.sendall(data)
        except OSError:
            return False
        return True

    def _protocol(self) -> int:
        """The RESP version this connection negotiated (2 until a HELLO 3)."""
        version: int = self.fake._client_info.protocol_version
        return version

    def _drain_wakes(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def finish(self) -> None:
        self.server.handlers.discard(self)
        self.fake.wake = None
        self.client.disconnect()  # type: ignore[no-untyped-call]
        with self._wake_lock:
            self._wake_read.close()
            self._wake_write.close()


class FakeRedisServer(TcpFakeServer):
    """``start()`` serves on ``url`` from threads of this process; ``stop()`` ends it."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, idle_wait_s: float = IDLE_WAIT_S
    ) -> None:
        super().__init__((host, port), server_version=(7, 4))
        self.idle_wait_s = idle_wait_s
        self.RequestHandlerClass = _RequestHandler
        # Client threads may sit in blocking reads; they must not keep the process alive.
        self.daemon_threads = True
        self.stopping = threading.Event()
        self.handlers: set[_RequestHandler] = set()
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.1},  # how soon stop() returns
            name="lcbus-fakeredis",
            daemon=True,
        )

    def start(self) -> str:
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"redis://{text(host)}:{port}/0"

    def stop(self) -> None:
        """Stop serving and wake every connection's thread, which then closes it."""
        self.stopping.set()
        for handler in list(self.handlers):
            handler.wake()
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
