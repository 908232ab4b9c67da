"""The frontend process's pub/sub connections, shared by all its clients.

One connection on a standalone Redis; on a Redis Cluster one per master
whose shard serves a watched channel (sharded pub/sub, ``SSUBSCRIBE``).

A topic channel is subscribed when its first client arrives and unsubscribed
when its last one leaves. A reader task parses each live message once and
offers it to every subscriber's bounded queue without ever waiting: a full
queue marks that one subscriber (see :class:`Subscriber`), the others go on.

Pub/sub is lossy across a dropped connection, so the hub never pretends
otherwise: when it reconnects it re-subscribes every channel and, once Redis
confirms, asks each subscriber to *resync*, i.e. re-read history after the
last event it delivered. History holds every event, so nothing is lost.

"Subscribed" means Redis confirmed the channel, which is what makes
"subscribe, then read history" gap-free. A channel moving to another shard
(a slot migration, a failover) is handled the same way: subscribe where it
lives now, wait for the confirmation, resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import (
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)

from bus.connect import is_cluster_client
from bus.errors import ServerDraining
from bus.frontend.link import RETRY_S, Link
from bus.frontend.reads import HistoryReads
from bus.frontend.subscriber import Subscriber
from bus.history import parse_message
from bus.keys import key_slot

log = logging.getLogger(__name__)


class _Channel:
    __slots__ = ("ready", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.ready = asyncio.Event()


class Hub:
    """The process's shared pub/sub connections; an async context manager.

    One connection on a standalone Redis (``SUBSCRIBE``); on a cluster one per
    master that owns a watched channel's slot (``SSUBSCRIBE``), opened when a
    channel first needs it. When a connection drops, a subscription is refused
    with ``MOVED``, or a node drops a subscription itself (it does so when the
    channel's slot migrates away), the hub refreshes the slot map, subscribes
    each affected channel where its slot lives now and, once confirmed, asks
    the channel's subscribers to resync from history.
    """

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
        self._redis: Any = redis
        self._cluster = is_cluster_client(redis)
        self._commands = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if self._cluster else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._name = name
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        # History reads (initial replays and resyncs): bounded, and shared by the
        # clients of a channel that ask for the same page at once (see HistoryReads).
        self.history_reads = HistoryReads(history_reads)
        self.draining = False
        self.ping_interval_s = ping_interval_s
        self._channels: dict[str, _Channel] = {}
        self._links: dict[str, Link] = {}
        self._route: dict[str, Link] = {}
        self._rerouted = 0
        self._unrouted: set[str] = set()
        """Channels with clients that no node serves yet (retried by ``_router``)."""
        self._router: asyncio.Task[None] | None = None
        self._started = False
        self.sent_at_once = 0
        """Live items written to a waiting client from the read loop (see Subscriber.inline)."""
        self.queued = 0
        """Live items left to a client's own stream instead (it was sending, replaying or
        behind), counted per client."""

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self._cluster:
            pool = self._redis.connection_pool
            self._open_link("redis", pool.connection_class, pool.connection_kwargs)

    async def aclose(self) -> None:
        if self._router is not None:
            self._router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._router
            self._router = None
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.aclose()
        self._started = False

    @property
    def connected(self) -> bool:
        """Every connection the watched channels need is up (and, standalone, the one)."""
        links = [link for link in self._links.values() if link.channels or not self._cluster]
        return all(link.connected for link in links)

    @property
    def reconnects(self) -> int:
        return self._rerouted + sum(link.reconnects for link in self._links.values())

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
            await self._route_new(channel)
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
                self._unrouted.discard(channel)
                gone = self._route.pop(channel, None)
                if gone is not None:
                    await gone.unsubscribe(channel)

    # -- routing (cluster) ---------------------------------------------------------

    async def _route_new(self, channel: str) -> None:
        """Subscribe a new channel where its slot is served, or, when no node serves it
        now (a node lost and its slots not yet taken over, the slot map unreadable),
        retry in the background: its clients wait for the confirmation, as they do
        while a standalone Redis is away, and then resync from history."""
        try:
            link = await self._link_for(channel)
        except (RedisClusterException, RedisError, OSError) as exc:
            log.warning("pub/sub: no node serves %s now (%s); retrying", channel, exc)
            self._unrouted.add(channel)
            if self._router is None or self._router.done():
                self._router = asyncio.create_task(self._route_unrouted(), name="lcbus-hub-route")
            return
        self._route[channel] = link
        await link.subscribe(channel)

    async def _route_unrouted(self) -> None:
        failures = 0
        while self._unrouted:
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1
            with contextlib.suppress(RedisError, OSError, RedisClusterException):
                await self._redis.nodes_manager.initialize()
            for channel in list(self._unrouted):
                if channel not in self._channels:
                    self._unrouted.discard(channel)
                    continue
                try:
                    link = await self._link_for(channel)
                except (RedisClusterException, RedisError, OSError):
                    continue
                self._unrouted.discard(channel)
                self._route[channel] = link
                await link.subscribe(channel)

    def _open_link(self, key: str, connection_class: Any, kwargs: dict[str, Any]) -> Link:
        # RESP2 on purpose: pub/sub messages then arrive as plain replies to read_response,
        # instead of going to redis-py's RESP3 push-handler machinery.
        conn_kwargs = {**kwargs, "client_name": self._name, "protocol": 2}
        link = self._links[key] = Link(
            self, self._commands, lambda: connection_class(**conn_kwargs)
        )
        link.start()
        return link

    async def _link_for(self, channel: str) -> Link:
        """The connection to the node that serves ``channel``'s slot now."""
        if not self._cluster:
            return self._links["redis"]
        await self._redis.initialize()
        slot = key_slot(channel)
        try:
            node = self._redis.nodes_manager.get_node_from_slot(slot)
        # redis-py raises KeyError for a slot missing from its map (a map read while
        # no node served the slot), SlotNotCoveredError for one mapped to nobody.
        except (SlotNotCoveredError, RedisClusterException, KeyError) as exc:
            current = self._route.get(channel)
            if current is not None:
                return current  # the node is down, nobody took its slots: wait for it
            raise SlotNotCoveredError(f"no node serves slot {slot}") from exc
        link = self._links.get(node.name)
        if link is None:
            link = self._open_link(node.name, node.connection_class, node.connection_kwargs)
        return link

    async def reroute(self, link: Link, *, refresh: bool = True) -> None:
        """Subscribe ``link``'s channels wherever their slots are served now."""
        if not self._cluster:
            return
        if refresh:
            with contextlib.suppress(RedisError, OSError, RedisClusterException):
                await self._redis.nodes_manager.initialize()
        for channel in list(link.channels):
            state = self._channels.get(channel)
            if state is None:
                continue
            try:
                target = await self._link_for(channel)
            except (SlotNotCoveredError, RedisClusterException):
                continue
            if target is link and channel in link.confirmed:
                continue
            if target is link:
                # Subscribed again on the same connection: the last SUBSCRIBE was
                # refused (no confirmation will come for it) or is still on its way,
                # with no unsubscribe in between, so any confirmation now counts.
                link.drop_pending(channel)
            self._rerouted += 1
            link.forget(channel)
            state.ready.clear()
            self._route[channel] = target
            await target.subscribe(channel)

    # -- called by the links ---------------------------------------------------------

    def deliver(self, channel: bytes, data: bytes) -> None:
        state = self._channels.get(channel.decode())
        if state is None:
            return
        try:
            item = parse_message(data)
        except (ValueError, UnicodeDecodeError):
            log.warning("skipping a malformed live message on %r", channel)
            return
        at_once = 0
        for sub in state.subscribers:
            at_once += sub.offer(item)
        self.sent_at_once += at_once
        self.queued += len(state.subscribers) - at_once

    def lost(self, link: Link) -> None:
        """``link``'s connection dropped: its channels wait for a fresh confirmation,
        which then asks their subscribers to resync (events may be missed meanwhile)."""
        for channel in link.channels:
            state = self._channels.get(channel)
            if state is not None and self._route.get(channel) is link:
                state.ready.clear()

    async def ensure_mapped(self, channel: str) -> None:
        """Before a confirmation lets clients read history: a channel confirmed while the
        client's slot map lacks its slot (read while no node served it) refreshes the
        map, else the history read would fail where the subscription just worked."""
        if self._cluster and key_slot(channel) not in self._redis.nodes_manager.slots_cache:
            with contextlib.suppress(RedisError, OSError, RedisClusterException):
                await self._redis.nodes_manager.initialize()

    def confirmed(self, link: Link, channel: str) -> None:
        state = self._channels.get(channel)
        if state is None or self._route.get(channel) is not link or state.ready.is_set():
            return
        state.ready.set()
        # Messages published while the channel was not subscribed are only in history.
        for sub in state.subscribers:
            sub.request_resync()


def hub_name(prefix: str) -> str:
    """The Redis CLIENT name of a process's hub connection (visible in CLIENT LIST)."""
    return f"{prefix}:frontend-hub:{os.getpid()}"
