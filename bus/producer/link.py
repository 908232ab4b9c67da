"""A raw connection to a standalone Redis, driven without blocking by an event loop
or blocking by the publisher's thread.

The loop flusher (:mod:`bus.producer.loop_flusher`) writes packed XADD batches
on it from the app's event loop and reads the replies when the socket is
readable. Everything that may block (name lookup, connect, ``AUTH``,
``SELECT``) happens in :func:`open_link`, which the publisher's thread calls;
the loop only ever calls the non-blocking :meth:`Link.write` and
:meth:`Link.read`. :meth:`Link.settle` reads what is still owed with a
deadline: the thread's own sends wait for a batch's replies with it, and so
does the thread when it takes the link back from a loop that stopped.

Only ``redis://`` and ``unix://`` URLs qualify (:func:`loop_capable`): for TLS
or a cluster the publisher keeps redis-py's client, which handles them.
"""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.connection import parse_url

from bus.runtime.roundtrip import command

Reply = Any
"""A hiredis reply: bytes, int, list, or a ``hiredis.ReplyError`` for an error reply."""

_READ_SIZE = 65536


def loop_capable(url: str) -> bool:
    """Whether a :class:`Link` can talk to ``url`` (plain TCP or a Unix socket)."""
    return urlsplit(url).scheme in ("redis", "unix")


class LinkError(ConnectionError):
    """The link failed: closed by Redis, refused, or a handshake error reply."""


class Link:
    """A connected, authenticated, non-blocking socket and its reply parser."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unsent = b""
        """Bytes :meth:`write` could not hand to the kernel yet (the socket was full)."""
        self._reader = hiredis.Reader()
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, data: bytes) -> None:
        """Send without blocking; what the kernel does not take waits in ``unsent``."""
        data = self.unsent + data if self.unsent else data
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        self.unsent = data[sent:]

    def read(self) -> list[Reply]:
        """The replies that arrived (none when nothing is readable). Raises LinkError on EOF."""
        try:
            data = self.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            raise LinkError("Redis closed the connection")
        return self._parsed(data)

    def settle(self, replies_due: int, timeout: float) -> list[Reply]:
        """Finish sending, then wait up to ``timeout`` for ``replies_due`` replies."""
        deadline = time.monotonic() + timeout
        replies = self._parsed(b"")
        try:
            if self.unsent:
                self.sock.settimeout(timeout)
                self.sock.sendall(self.unsent)
                self.unsent = b""
            while len(replies) < replies_due:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                data = self.sock.recv(_READ_SIZE)
                if not data:
                    break
                replies += self._parsed(data)
        except OSError:
            pass  # what was not answered goes back to the buffer
        return replies

    def close(self) -> None:
        self.sock.close()

    def _parsed(self, data: bytes) -> list[Reply]:
        if data:
            self._reader.feed(data)
        replies = []
        while (reply := self._reader.gets()) is not False:
            replies.append(reply)
        return replies


def open_link(url: str, *, timeout: float) -> Link:
    """Connect to ``url`` and authenticate (blocking; called from the publisher's thread)."""
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    if "path" in options:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(options["path"])
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection(
            (options.get("host", "localhost"), options.get("port", 6379)), timeout=timeout
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        _handshake(sock, options)
    except BaseException:
        sock.close()
        raise
    return Link(sock)


def _handshake(sock: socket.socket, options: dict[str, Any]) -> None:
    commands = []
    password = options.get("password")
    if password is not None:
        user = options.get("username")
        credentials = (user.encode(), password.encode()) if user else (password.encode(),)
        commands.append(command(b"AUTH", *credentials))
    if options.get("db"):
        commands.append(command(b"SELECT", str(options["db"]).encode()))
    if not commands:
        return
    sock.sendall(b"".join(commands))
    reader = hiredis.Reader()
    for _ in commands:
        reply = reader.gets()
        while reply is False:
            data = sock.recv(_READ_SIZE)
            if not data:
                raise LinkError("Redis closed the connection during the handshake")
            reader.feed(data)
            reply = reader.gets()
        if isinstance(reply, hiredis.ReplyError):
            raise LinkError(f"handshake refused: {reply}")
