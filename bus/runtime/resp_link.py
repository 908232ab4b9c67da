"""A connection of its own for the hand-packed round trips to a standalone Redis.

The partition readers make a round trip per batch, the fan-out handler one or
two more, so at a few events per batch (many traces, a few tokens a second
each: the usual load) the cost of a round trip is most of a worker's CPU.
Through redis-py's asyncio client a PING costs about 150 to 190 µs of CPU on
a 2-core VM, against 35 to 50 µs over a bare asyncio transport: redis-py
checks a connection out of its pool and back in (recording pool metrics each
time), wraps every write and every read in a timeout with a task of its own,
and takes three to four turns of the event loop per command.

A :class:`RespLink` is one TCP or Unix socket connection with a protocol that
feeds hiredis: a round trip writes its packed commands at once, queues a
waiter for its replies, and the replies are handed out in order as they come
(Redis answers in order), as redis-py's hiredis parser gives them on a RESP2
connection (error replies become redis-py's exception classes). redis-py 8
speaks RESP3 unless told otherwise; the callers read both shapes. Concurrent
round trips pipeline on the one connection.

Failures: a lost connection, a timeout or a protocol error fail every waiter
with redis-py's ``ConnectionError`` or ``TimeoutError`` and close the link;
the next round trip connects again. A caller cancelled while it waits leaves
its replies to be read and dropped, which keeps the connection in step, except
for a blocking round trip (``XREADGROUP BLOCK``): that one closes the link, as
redis-py's disconnect does, so that Redis drops the blocked read instead of
serving it, later, to a reader that is gone.

It covers what a standalone Redis URL gives: host and port or a socket path,
user and password, database, client name, socket and connect timeouts. Any
other client (TLS, a credential provider, RESP3 asked for explicitly, decoded
replies, a cluster)
gets no link from :meth:`RespLink.for_client` and its callers go through
redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.connect import is_cluster_client
from bus.runtime.roundtrip import command

_UNCOVERED_OPTIONS = ("credential_provider", "redis_connect_func")
"""Connection options that change how a connection is made; a client with one set
gets no link (TLS shows in the connection class)."""


class _Waiter:
    __slots__ = ("answers", "expected", "future")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int) -> None:
        self.future = future
        self.expected = expected
        self.answers: list[Any] = []


class _Protocol(asyncio.Protocol):
    __slots__ = ("_link",)

    def __init__(self, link: RespLink) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(self, exc)


class RespLink:
    """One pipelined connection for hand-packed round trips; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        client_name: str | None = None,
        socket_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._handshake = _handshake(db, username, password, client_name)
        self._timeout = socket_timeout
        self._connect_timeout = connect_timeout if connect_timeout else socket_timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._reader: Any = None
        self._waiters: deque[_Waiter] = deque()
        self._connecting = asyncio.Lock()
        self._closed = False

    @classmethod
    def for_client(cls, redis: aioredis.Redis) -> RespLink | None:
        """A link to the server ``redis`` talks to, with its options; None when the
        client is one a link does not cover (see the module docstring)."""
        if is_cluster_client(redis):
            return None
        pool = redis.connection_pool
        options: dict[str, Any] = dict(pool.connection_kwargs)
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            return None
        if any(options.get(name) is not None for name in _UNCOVERED_OPTIONS):
            return None
        if options.get("decode_responses") or options.get("protocol") not in (None, 2, "2"):
            return None
        return cls(
            host=options.get("host", "localhost"),
            port=int(options.get("port", 6379)),
            path=options.get("path"),
            db=int(options.get("db") or 0),
            username=options.get("username"),
            password=options.get("password"),
            client_name=options.get("client_name"),
            socket_timeout=options.get("socket_timeout"),
            connect_timeout=options.get("socket_connect_timeout"),
        )

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def round_trip(
        self, packed: Sequence[bytes], replies: int, *, blocking: bool = False
    ) -> list[Any]:
        """Write ``packed`` (``replies`` commands) and return their replies, in order.

        Raises the first error reply after every reply was read, like
        :func:`bus.runtime.roundtrip.round_trip`. ``blocking``: the commands
        include a blocking one (see the module docstring on cancellation).
        """
        if self._transport is None:
            await self._connect()
        return await self._exchange(b"".join(packed), replies, blocking=blocking)

    def close(self) -> None:
        """Close the connection for good; waiters fail with ``ConnectionError``."""
        self._closed = True
        self._drop(RedisConnectionError("the link was closed"))

    # -- internals ---------------------------------------------------------------

    async def _exchange(self, data: bytes, replies: int, *, blocking: bool) -> list[Any]:
        transport = self._transport
        if transport is None:
            raise RedisConnectionError("Connection closed by server.")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), replies)
        self._waiters.append(waiter)
        transport.write(data)
        try:
            if self._timeout is None:
                answers = await waiter.future
            else:
                async with asyncio.timeout(self._timeout):
                    answers = await waiter.future
        except TimeoutError:
            self._drop(RedisTimeoutError("Timeout reading from Redis"))
            raise RedisTimeoutError("Timeout reading from Redis") from None
        except asyncio.CancelledError:
            if blocking:
                self._drop(RedisConnectionError("a blocking read was cancelled"))
            raise
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    async def _connect(self) -> None:
        if self._closed:
            raise RedisConnectionError("the link was closed")
        async with self._connecting:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            where = self._path or f"{self._host}:{self._port}"
            protocol = _Protocol(self)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    if self._path is not None:
                        transport, _ = await loop.create_unix_connection(
                            lambda: protocol, self._path
                        )
                    else:
                        transport, _ = await loop.create_connection(
                            lambda: protocol, self._host, self._port
                        )
            except TimeoutError:
                raise RedisTimeoutError(f"Timeout connecting to {where}") from None
            except OSError as exc:
                raise RedisConnectionError(f"Error connecting to {where}: {exc}") from exc
            # Not checked: uvloop's transports do not derive from asyncio's classes.
            self._transport, self._protocol = transport, protocol
            self._reader = hiredis.Reader(
                protocolError=InvalidResponse, replyError=BaseParser.parse_error
            )
            if self._handshake:
                try:
                    handshake = b"".join(self._handshake)
                    await self._exchange(handshake, len(self._handshake), blocking=False)
                except BaseException:
                    self._drop(RedisConnectionError(f"handshake with {where} failed"))
                    raise

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        try:
            while (reply := reader.gets()) is not False:
                if not waiters:
                    raise InvalidResponse("a reply that no command asked for")
                head = waiters[0]
                head.answers.append(reply)
                if len(head.answers) == head.expected:
                    waiters.popleft()
                    if not head.future.done():
                        head.future.set_result(head.answers)
        except InvalidResponse as exc:
            self._drop(RedisConnectionError(f"Protocol error from Redis: {exc}"))

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            reason = (
                f"Connection closed by server ({exc})." if exc else "Connection closed by server."
            )
            self._drop(RedisConnectionError(reason))

    def _drop(self, exc: Exception) -> None:
        """Close the connection (if open) and fail every waiter with ``exc``."""
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                transport.abort()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(exc)


def _handshake(
    db: int, username: str | None, password: str | None, client_name: str | None
) -> list[bytes]:
    commands: list[bytes] = []
    if password is not None:
        auth = (username.encode(), password.encode()) if username else (password.encode(),)
        commands.append(command(b"AUTH", *auth))
    if client_name:
        commands.append(command(b"CLIENT", b"SETNAME", client_name.encode()))
    if db:
        commands.append(command(b"SELECT", b"%d" % db))
    return commands
