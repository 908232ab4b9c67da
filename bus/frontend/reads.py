"""History reads of one frontend process: bounded in number, shared when identical.

A burst of clients of one topic, or every client of a channel resyncing after
the hub reconnected, asks history for the same page at the same moment (the
same topic, after the same event). One read then serves them all: the page
is a list of immutable items that each client only iterates. Reads in flight
are bounded too, so that a burst queues here instead of emptying the
connection pool that the other endpoints share.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable

import redis.asyncio as aioredis

from bus.history import StreamItem, Topic, read_after
from bus.keys import Keys

__all__ = ["HistoryReads"]


class HistoryReads:
    """History pages read at most ``limit`` at a time, one read per identical request."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self._in_flight: dict[Hashable, asyncio.Future[list[StreamItem]]] = {}

    async def page(
        self, redis: aioredis.Redis, keys: Keys, topic: Topic, after: str | None, *, count: int
    ) -> list[StreamItem]:
        """History after ``after`` (see :func:`bus.history.read_after`); do not mutate it."""
        key = (topic, after, count)
        pending = self._in_flight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._read(redis, keys, topic, after, count))
            self._in_flight[key] = pending
            pending.add_done_callback(functools.partial(self._done, key))
        # Shielded: a reader that goes away (its client left) leaves the read to the others.
        return await asyncio.shield(pending)

    async def _read(
        self, redis: aioredis.Redis, keys: Keys, topic: Topic, after: str | None, count: int
    ) -> list[StreamItem]:
        async with self.slots:
            return await read_after(redis, keys, topic, after, count=count)

    def _done(self, key: Hashable, future: asyncio.Future[list[StreamItem]]) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved, so that a read nobody awaits any more is not logged
