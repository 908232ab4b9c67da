"""One Redis pub/sub connection per frontend process, shared by all its clients.

A topic channel is subscribed when its first client arrives and unsubscribed
when its last one leaves. A reader task parses each live message once and
offers it to every subscriber's bounded queue without ever waiting: a full
queue marks that one subscriber (see :class:`Subscriber`), the others go on.

Pub/sub is lossy across a dropped connection, so the hub never pretends
otherwise: when it reconnects it re-subscribes every channel and, once Redis
confirms, asks each subscriber to *resync*, i.e. re-read history after the
last event it delivered. History holds every event, so nothing is lost.

The connection is a raw :class:`redis.asyncio.Connection` rather than
redis-py's ``PubSub`` so that the hub, not the library, decides how
reconnection and confirmations work: "subscribed" means Redis confirmed the
channel, which is what makes "subscribe, then read history" gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bus.errors import ServerDraining, SlowConsumer
from bus.history import StreamItem, parse_message

log = logging.getLogger(__name__)

_RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)


class Subscriber:
    """One client's view of one channel: a queue bounded in items and bytes, and flags.

    ``resync`` asks the client to re-read history after its last event (set
    after a reconnect, or when the queue overflows while the client is still
    replaying history or waiting to: then history has everything the queue
    dropped). ``overflowed`` means the client fell behind while live: it is
    dropped, and ``on_overflow`` (when set) is called once, so that a client
    stuck in a blocked write is cut at once rather than when the write times
    out. ``stalled`` (when set) says the client's current write has been
    blocked too long: it is then behind too, whatever its queue holds.
    ``draining`` ends the stream because the process shuts down.
    """

    __slots__ = (
        "_wake",
        "draining",
        "items",
        "max_bytes",
        "maxsize",
        "on_overflow",
        "overflowed",
        "queued_bytes",
        "replaying",
        "resync",
        "stalled",
    )

    def __init__(self, maxsize: int, max_bytes: int = 0) -> None:
        self.items: deque[StreamItem] = deque()
        self.maxsize = maxsize
        self.max_bytes = max_bytes  # 0: no byte bound
        self.queued_bytes = 0
        self.resync = True
        self.replaying = False
        self.overflowed = False
        self.draining = False
        self.on_overflow: Callable[[], None] | None = None
        self.stalled: Callable[[], bool] | None = None
        self._wake = asyncio.Event()

    def offer(self, item: StreamItem) -> None:
        """Called by the hub's reader; never blocks."""
        if self.overflowed:
            return
        size = len(item.payload)
        # An empty queue takes any one item, however big (a final event carries a
        # whole message). A client whose current write has been blocked too long is
        # behind whatever the size of its queue.
        full = (
            len(self.items) >= self.maxsize
            or (self.max_bytes > 0 and self.queued_bytes + size > self.max_bytes and self.items)
            or (self.stalled is not None and self.stalled())
        )
        if full:
            self.items.clear()
            self.queued_bytes = 0
            if self.replaying or self.resync:
                self.resync = True
            else:
                self.overflowed = True
                if self.on_overflow is not None:
                    self.on_overflow()
        else:
            self.items.append(item)
            self.queued_bytes += size
        self._wake.set()

    def drain_for_shutdown(self) -> None:
        self.draining = True
        self._wake.set()

    def request_resync(self) -> None:
        self.resync = True
        self._wake.set()

    def drain(self) -> list[StreamItem]:
        """Every live item queued right now (none while a resync or a drop is pending)."""
        if self.overflowed or self.resync or self.draining or not self.items:
            return []
        items = list(self.items)
        self.items.clear()
        self.queued_bytes = 0
        return items

    async def next(self) -> StreamItem | None:
        """The next live item, or None when the client must resync from history."""
        while True:
            if self.draining:
                raise ServerDraining("the frontend is shutting down; reconnect")
            if self.overflowed:
                raise SlowConsumer("client fell behind its queue (slow consumer)")
            if self.resync:
                return None
            if self.items:
                item = self.items.popleft()
                self.queued_bytes -= len(item.payload)
                return item
            self._wake.clear()
            await self._wake.wait()


class _Channel:
    __slots__ = ("ready", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.ready = asyncio.Event()


class Hub:
    """The process's shared pub/sub connection; an async context manager."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        queue_size: int,
        ping_interval_s: float,
        name: str,
        queue_bytes: int = 0,
        history_reads: int = 32,
    ) -> None:
        pool = redis.connection_pool
        # RESP2 on purpose: pub/sub messages then arrive as plain replies to read_response,
        # instead of going to redis-py's RESP3 push-handler machinery.
        kwargs = {**pool.connection_kwargs, "client_name": name, "protocol": 2}
        self._conn_kwargs: dict[str, Any] = kwargs
        self._conn_class: Any = pool.connection_class
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        # History reads in flight at once (initial replays and resyncs): a burst of
        # clients, or every client resyncing after a reconnect, queues here instead
        # of emptying the connection pool that the other endpoints share.
        self.history_reads = asyncio.Semaphore(history_reads)
        self.draining = False
        self._ping_interval_s = ping_interval_s
        self._channels: dict[str, _Channel] = {}
        # SUBSCRIBEs sent per channel on the current connection and not yet confirmed.
        self._pending: dict[str, int] = {}
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.reconnects = 0

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="lcbus-hub")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def drain(self) -> None:
        """Shutting down: every subscriber's stream ends with :class:`ServerDraining`."""
        self.draining = True
        for state in self._channels.values():
            for sub in state.subscribers:
                sub.drain_for_shutdown()
            state.ready.set()  # wakes clients still waiting for the subscription

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        channel: str,
        *,
        on_overflow: Callable[[], None] | None = None,
        stalled: Callable[[], bool] | None = None,
    ) -> AsyncIterator[Subscriber]:
        """A subscriber on ``channel``, yielded once Redis confirmed the subscription."""
        if self.draining:
            raise ServerDraining("the frontend is shutting down; reconnect")
        sub = Subscriber(self._queue_size, self._queue_bytes)
        sub.on_overflow = on_overflow
        sub.stalled = stalled
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
            await self._send("SUBSCRIBE", channel)
        state.subscribers.add(sub)
        try:
            await state.ready.wait()
            if self.draining:
                raise ServerDraining("the frontend is shutting down; reconnect")
            yield sub
        finally:
            state.subscribers.discard(sub)
            if not state.subscribers and self._channels.get(channel) is state:
                del self._channels[channel]
                await self._send("UNSUBSCRIBE", channel)

    async def _send(self, command: str, channel: str) -> None:
        conn = self._conn
        if conn is None:
            return  # the reader subscribes every live channel when it reconnects
        if command == "SUBSCRIBE":
            self._pending[channel] = self._pending.get(channel, 0) + 1
        try:
            await conn.send_command(command, channel)
        except (RedisError, OSError) as exc:
            log.warning(
                "pub/sub %s %s failed (%s); the reader will reconnect", command, channel, exc
            )

    async def _run(self) -> None:
        failures = 0
        while True:
            conn = self._conn_class(**self._conn_kwargs)
            try:
                await conn.connect()
                await self._resubscribe_all(conn)
                failures = 0
                await self._pump(conn)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
            finally:
                self._conn = None
                self.connected = False
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
            failures += 1
            self.reconnects += 1

    async def _resubscribe_all(self, conn: Any) -> None:
        self._pending = {}
        self._conn = conn
        self.connected = True
        # Snapshot with no await in between: channels added later send their own SUBSCRIBE.
        for channel, state in list(self._channels.items()):
            state.ready.clear()
            await self._send("SUBSCRIBE", channel)

    async def _pump(self, conn: Any) -> None:
        awaiting_pong = False
        while True:
            reply = await conn.read_response(timeout=self._ping_interval_s)
            if reply is None:
                if awaiting_pong:
                    raise ConnectionError("pub/sub connection did not answer PING")
                await conn.send_command("PING")
                awaiting_pong = True
                continue
            awaiting_pong = False
            if isinstance(reply, list) and reply:
                self._handle(reply)

    def _handle(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            state = self._channels.get(reply[1].decode())
            if state is None:
                return
            try:
                item = parse_message(reply[2])
            except (ValueError, UnicodeDecodeError):
                log.warning("skipping a malformed live message on %r", reply[1])
                return
            for sub in state.subscribers:
                sub.offer(item)
        elif kind == b"subscribe":
            self._confirm(reply[1].decode())

    def _confirm(self, channel: str) -> None:
        left = self._pending.get(channel, 1) - 1
        if left > 0:
            self._pending[channel] = left
            return
        self._pending.pop(channel, None)
        state = self._channels.get(channel)
        if state is None or state.ready.is_set():
            return
        state.ready.set()
        # Messages published while the channel was not subscribed are only in history.
        for sub in state.subscribers:
            sub.request_resync()


def hub_name(prefix: str) -> str:
    """The Redis CLIENT name of a process's hub connection (visible in CLIENT LIST)."""
    return f"{prefix}:frontend-hub:{os.getpid()}"
