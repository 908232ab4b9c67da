"""Replay, then live: one client's gap-free, duplicate-free view of a topic.

The order of steps is what makes it exact: subscribe (and wait for Redis to
confirm), then read history after the client's position, then take live
items, dropping any whose sequence number was already delivered. Every event
of a topic carries a per-topic sequence number that grows by one, so a live
item that skips ahead means something was lost on the way (a reconnect); the
client then re-reads history instead of getting a gap.

Items come in batches (:func:`follow_batches`): a history page, or every live
item already queued for the client. A frontend writes a batch to its client
as one chunk, so a burst costs one socket write instead of one per event.

A caller that can write an item at once passes ``inline``: while the follower
waits for live items, the hub hands it each one that continues the cursor
(not the final one, not after a gap) from its own read loop, and the cursor
advances when ``inline`` took it. Order is kept: an item that ``inline``
refuses is queued, and every later one queues behind it until the follower
has taken the queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ClusterDownError, TryAgainError

from bus.errors import EventsMissed, InvalidPosition
from bus.frontend.hub import Hub
from bus.frontend.reads import HistoryReads
from bus.frontend.subscriber import Subscriber
from bus.history import StreamItem, Topic, is_event_id, position, read_after
from bus.keys import HISTORY_FINAL, HISTORY_SEQ, Keys

REPLAY_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Start:
    """Where a client resumes: after an event id, after a sequence number, or from the start."""

    event_id: str | None = None
    seq: int | None = None

    @property
    def resuming(self) -> bool:
        return self.event_id is not None or self.seq is not None


@dataclass(slots=True)
class _Cursor:
    seq: int = 0  # last sequence number delivered (0: nothing yet)
    event_id: str | None = None  # its history id, where the next history read starts
    ended: bool = False  # the topic's final event is at or before the cursor


async def follow(
    hub: Hub, redis: aioredis.Redis, keys: Keys, topic: Topic, start: Start
) -> AsyncIterator[StreamItem]:
    """Every event of ``topic`` after ``start``, one by one (see :func:`follow_batches`)."""
    async for batch in follow_batches(hub, redis, keys, topic, start):
        for item in batch:
            yield item


async def follow_batches(
    hub: Hub,
    redis: aioredis.Redis,
    keys: Keys,
    topic: Topic,
    start: Start,
    *,
    on_overflow: Callable[[], None] | None = None,
    stalled: Callable[[], bool] | None = None,
    inline: Callable[[StreamItem], bool] | None = None,
) -> AsyncIterator[list[StreamItem]]:
    """Every event of ``topic`` after ``start``, in order, ending after the final one.

    Each batch is non-empty and continues exactly where the previous one
    stopped. Raises :class:`EventsMissed` when history no longer reaches back
    to a resuming client's position (also later, should history be trimmed
    past a client that fell behind), :class:`InvalidPosition` for a position
    that is not in this topic, and :class:`~bus.errors.SlowConsumer` from the
    hub (``on_overflow`` is called the moment the client falls that far
    behind, or when ``stalled()`` says its writes are stuck). A fresh client
    (no position) gets whatever history still holds.
    """
    channel = topic.channel(keys)
    async with hub.subscribe(channel, on_overflow=on_overflow, stalled=stalled) as sub:
        async with hub.history_reads.slots:
            cursor = await resolve(redis, keys, topic, start)
        strict = start.resuming
        take_now = None if inline is None else _inline_taker(cursor, inline)
        while not cursor.ended:
            if sub.resync and not sub.draining:
                replay = _replay(sub, hub.history_reads, redis, keys, topic, cursor, strict=strict)
                async for page in replay:
                    yield page
                strict = True
                continue
            sub.inline = take_now
            try:
                live = await sub.next()
            finally:
                sub.inline = None
            if live is None:
                continue
            batch = _accept(sub, cursor, (live, *sub.drain()))
            if batch:
                yield batch


def _inline_taker(
    cursor: _Cursor, inline: Callable[[StreamItem], bool]
) -> Callable[[StreamItem], bool]:
    """What the subscriber offers live items to while the follower waits (see the module
    docstring): the next item in sequence goes to ``inline``; a duplicate is dropped, as
    :func:`_accept` drops it; a gap or the final item queues, for the follower to handle."""

    def take_now(item: StreamItem) -> bool:
        if item.seq <= cursor.seq:
            return True
        if item.seq > cursor.seq + 1 or item.final or not inline(item):
            return False
        _advance(cursor, item)
        return True

    return take_now


def _accept(sub: Subscriber, cursor: _Cursor, items: Iterable[StreamItem]) -> list[StreamItem]:
    """The live items that continue the cursor; a gap asks for a resync instead."""
    batch: list[StreamItem] = []
    for item in items:
        if item.seq <= cursor.seq:
            continue  # already delivered (from history)
        if item.seq > cursor.seq + 1:
            # A live message was lost. Everything the hub received is already in
            # history (appended before it was published), so dropping the rest
            # of this burst loses nothing: the resync reads it back.
            sub.request_resync()
            break
        _advance(cursor, item)
        batch.append(item)
        if cursor.ended:
            break
    return batch


async def _replay(
    sub: Subscriber,
    reads: HistoryReads,
    redis: aioredis.Redis,
    keys: Keys,
    topic: Topic,
    cursor: _Cursor,
    *,
    strict: bool,
) -> AsyncIterator[list[StreamItem]]:
    sub.resync = False
    sub.replaying = True
    try:
        while not cursor.ended and not sub.draining:
            page = await reads.page(redis, keys, topic, cursor.event_id, count=REPLAY_PAGE)
            if not page:
                return
            if page[0].seq > cursor.seq + 1 and (strict or cursor.seq > 0):
                raise EventsMissed(
                    f"history starts at seq {page[0].seq}, after the client's seq {cursor.seq}"
                )
            fresh: list[StreamItem] = []
            for item in page:
                cursor.event_id = item.event_id
                if item.seq > cursor.seq:
                    _advance(cursor, item)
                    fresh.append(item)
                    if cursor.ended:
                        break
            if fresh:
                yield fresh
            if len(page) < REPLAY_PAGE:
                # History held nothing more when read. Every later event is appended
                # before it is published, and the subscription was confirmed before
                # this read: it comes live (duplicates are skipped by seq, a gap
                # resyncs). One read less per replay, for every client of a burst.
                return
    finally:
        sub.replaying = False


def _advance(cursor: _Cursor, item: StreamItem) -> None:
    cursor.seq = item.seq
    cursor.event_id = item.event_id
    cursor.ended = item.final


async def resolve(redis: aioredis.Redis, keys: Keys, topic: Topic, start: Start) -> _Cursor:
    """The cursor for ``start``; :class:`EventsMissed` or :class:`InvalidPosition` otherwise."""
    if start.event_id is not None:
        return await _resolve_id(redis, keys, topic, start.event_id)
    if start.seq is not None and start.seq > 0:
        return await _resolve_seq(redis, keys, topic, start.seq)
    return _Cursor()


async def _resolve_id(redis: aioredis.Redis, keys: Keys, topic: Topic, event_id: str) -> _Cursor:
    if not is_event_id(event_id):
        raise InvalidPosition(f"not an event id: {event_id!r}")
    try:
        found: Any = await redis.xrange(topic.history(keys), min=event_id, max=event_id, count=1)
    except (ClusterDownError, TryAgainError):
        # Replies, but no verdict on the id: the slot's master is down or rejoining
        # (an outage the client retries, like a lost connection).
        raise
    except aioredis.ResponseError:
        raise InvalidPosition(f"not an event id: {event_id!r}") from None
    if found:
        _, fields = found[0]
        return _Cursor(int(fields[HISTORY_SEQ]), event_id, fields.get(HISTORY_FINAL) == b"1")
    state = await position(redis, keys, topic, event_id)
    if state == "missed":
        raise EventsMissed(f"event {event_id} is no longer in history")
    if state == "unknown":
        raise InvalidPosition(f"event {event_id} is not in this stream's history")
    return _Cursor(0, event_id)


async def _resolve_seq(redis: aioredis.Redis, keys: Keys, topic: Topic, seq: int) -> _Cursor:
    """The cursor at sequence number ``seq``.

    History ids are not sequence numbers, so this walks history from its head
    (bounded by the history's length); a resume by event id needs no walk.
    """
    after: str | None = None
    while True:
        page = await read_after(redis, keys, topic, after, count=REPLAY_PAGE)
        if not page and after is not None:
            raise InvalidPosition(f"seq {seq} lies beyond this stream's history")
        if not page or (after is None and page[0].seq > seq):
            raise EventsMissed(f"seq {seq} is no longer in history")
        for item in page:
            if item.seq == seq:
                return _Cursor(seq, item.event_id, item.final)
        if page[-1].seq > seq:
            raise InvalidPosition(f"seq {seq} is not in this stream's history")
        after = page[-1].event_id
