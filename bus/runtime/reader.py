"""Reading one leased partition with ``XREADGROUP`` under its consumer name ``p{partition}``.

A reader first re-reads the name's pending entries (cursor ``0``: whatever a
dead owner had read but not acknowledged), then new ones (cursor ``>``). The
acknowledgement of a batch travels with the next read. The lease deadline is
checked before every read and no blocking read outlasts it, so a read served
after the lease moved cannot park entries under a name another replica owns.

On a standalone Redis the replies of ``XREADGROUP`` stay as Redis sent them
(see :func:`stream_client`): redis-py would build a dict per entry, which
costs about as much as decoding the event.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bus.connect import is_cluster_client
from bus.keys import Keys
from bus.parsing import text
from bus.runtime.batches import BatchHandler, BatchProcessor, ConsumerStats, Entries
from bus.runtime.lease import HeldPartition
from bus.runtime.outage import TRANSIENT_ERRORS, Outage
from bus.settings import Settings

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.05
"""Pause after an empty read that came back early (a server whose blocking read does
not block, such as plain fakeredis 2.40)."""
MIN_BLOCK_MS = 20


async def ensure_group(redis: aioredis.Redis, keys: Keys, group: str, partition: int) -> None:
    """Create ``group`` on the partition's stream (and the stream) unless it exists."""
    # Start id 0: events published before any worker of the group ever
    # ran are still delivered.
    try:
        await redis.xgroup_create(keys.events(partition), group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def stream_client(redis: aioredis.Redis) -> aioredis.Redis:
    """The client a reader reads with: ``redis``, or a copy whose XREADGROUP replies
    are left as Redis sent them (entries ``[id, [field, value, …]]``).

    The copy shares ``redis``'s pool and settings and only has a table of reply
    parsers of its own, so nothing changes for ``redis``'s other users. A cluster
    client (its nodes share its table) and a single-connection client (a copy would
    share the connection it owns) are used as they are: :func:`entries_of` reads
    both shapes.
    """
    if is_cluster_client(redis) or redis.single_connection_client:
        return redis
    raw = copy.copy(redis)
    raw.response_callbacks = copy.copy(redis.response_callbacks)  # case-insensitive still
    raw.set_response_callback("XREADGROUP", _as_sent)
    return raw


def _as_sent(response: Any, **options: Any) -> Any:
    return response


class PartitionReader:
    """Reads the partitions one consumer holds, one :meth:`run` task per partition."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        settings: Settings,
        group: str,
        handler: BatchHandler,
        stats: ConsumerStats,
        margin_s: float,
        stopping: Callable[[], bool],
    ) -> None:
        self._redis = redis
        self._stream_redis = stream_client(redis)
        self._settings = settings
        self._keys = Keys(settings.prefix, settings.partitions)
        self._group = group
        self._processor = BatchProcessor(
            redis=redis, settings=settings, group=group, handler=handler, stats=stats
        )
        self._stats = stats
        self._margin_s = margin_s
        self._stopping = stopping

    async def run(self, part: HeldPartition) -> None:
        """Read and process until the consumer stops or the partition is to be released."""
        stream = self._keys.events(part.index)
        consumer = f"p{part.index}"
        outage = Outage(f"consumer {self._group} partition {part.index}", self._stats)
        # "0" re-reads this consumer name's pending entries, ">" reads new ones.
        cursor = "0"
        while not (self._stopping() or part.release):
            part.check()
            try:
                entries, cursor = await self._read(part, stream, consumer, cursor)
                if entries or part.holds.due():
                    await self._processor.process(part, entries)
                elif cursor == ">" and await self._parked(part, stream, consumer):
                    cursor = "0"
                outage.recovered()
            except TRANSIENT_ERRORS as exc:  # before ResponseError: CLUSTERDOWN is one
                # Whatever we read but did not ack is still pending: start over from it.
                cursor = "0"
                await asyncio.sleep(min(outage.failed(exc), max(part.remaining_s(), 0.01)))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (Redis restarted empty, key deleted).
                await ensure_group(self._redis, self._keys, self._group, part.index)
                cursor = "0"

    async def flush_acks(self, part: HeldPartition) -> None:
        """Acknowledge the last batch now instead of with the next read."""
        if part.unacked:
            await self._redis.xack(self._keys.events(part.index), self._group, *part.unacked)
            part.unacked = []

    async def _parked(self, part: HeldPartition, stream: str, consumer: str) -> bool:
        """Whether entries wait in this name's pending list that nobody holds.

        A previous holder starved past its lease (a stalled process) can have a
        read served after this replica already re-read the pending list: those
        entries would sit there until the next lease change. An idle reader
        looks now and then (every lease period at most), and re-reads them.
        """
        now = time.monotonic()
        if now < part.next_pending_check:
            return False
        part.next_pending_check = now + self._settings.lease_ttl_ms / 1000
        summary: Any = await self._redis.xpending(stream, self._group)
        if _pending_of(summary, consumer) > len(part.unacked) + part.holds.entries:
            log.warning("re-reading parked entries of %s partition %d", self._group, part.index)
            return True
        return False

    async def _read(
        self, part: HeldPartition, stream: str, consumer: str, cursor: str
    ) -> tuple[Entries, str]:
        if cursor != ">":
            reply, _ = await self._xread(part, stream, consumer, cursor, None)
            entries = entries_of(reply)
            if not entries:
                return [], ">"
            return entries, text(entries[-1][0])
        if self._settings.read_block_ms <= 0:
            # Polling mode, for servers whose blocking XREADGROUP misbehaves (plain
            # fakeredis 2.40 answers empty; the demo's embedded server blocks).
            new = await self._read_new(part, stream, consumer, None)
            if new is None:
                return [], "0"
            if not new:
                await asyncio.sleep(IDLE_SLEEP_S)
            return new, ">"
        # Never block past the lease deadline: a read served after the lease
        # moved would park new entries in a name another replica now owns.
        budget_ms = int((part.remaining_s() - self._margin_s) * 1000)
        if part.holds.full:
            # Holding all it may: wait for a held trace's retry instead of reading on.
            wait_s = min(part.holds.seconds_to_next_retry(), max(budget_ms, 0) / 1000)
            await asyncio.sleep(max(wait_s, MIN_BLOCK_MS / 1000))
            return [], ">"
        # Nor past a held trace's next retry.
        retry_ms = part.holds.seconds_to_next_retry() * 1000
        block_ms = int(min(self._settings.read_block_ms, budget_ms, retry_ms))
        if block_ms < MIN_BLOCK_MS:
            await asyncio.sleep(max(block_ms, MIN_BLOCK_MS) / 1000)
            return [], ">"
        started = time.monotonic()
        new = await self._read_new(part, stream, consumer, block_ms)
        if new is None:
            return [], "0"
        if not new and time.monotonic() - started < block_ms / 2000:
            await asyncio.sleep(IDLE_SLEEP_S)
        return new, ">"

    async def _read_new(
        self, part: HeldPartition, stream: str, consumer: str, block: int | None
    ) -> Entries | None:
        """New entries, or None when older ones wait, parked, in this name's pending list.

        A read whose reply was lost (a socket timeout, a broken connection:
        Redis stalled, or this process did) can still be served after the
        next read, parking the entries it took while later ones are handed
        out. The pending count read right after every read tells: if this
        name holds more than it just received, the caller re-reads the whole
        pending list, which returns the parked entries first, in stream order.
        """
        reply, pending = await self._xread(part, stream, consumer, ">", block, check=True)
        entries = entries_of(reply)
        if entries and pending > len(entries) + part.holds.entries:
            log.warning("re-reading parked entries of %s partition %d", self._group, part.index)
            return None
        return entries

    async def _xread(
        self,
        part: HeldPartition,
        stream: str,
        consumer: str,
        cursor: str,
        block: int | None,
        *,
        check: bool = False,
    ) -> tuple[Any, int]:
        """One read, with the pending acks before it and, if ``check``, the count of
        this name's pending entries right after it (else -1), in one round trip."""
        count = self._settings.read_count
        if not part.unacked and not check:
            reply = await self._stream_redis.xreadgroup(
                self._group, consumer, {stream: cursor}, count=count, block=block
            )
            return reply, -1
        async with self._stream_redis.pipeline(transaction=False) as pipe:
            if part.unacked:
                pipe.xack(stream, self._group, *part.unacked)
            pipe.xreadgroup(self._group, consumer, {stream: cursor}, count=count, block=block)
            if check:
                pipe.xpending(stream, self._group)
            replies = await pipe.execute()
        pending = _pending_of(replies.pop(), consumer) if check else -1
        # Kept until here on purpose: XACK is idempotent, so after an error
        # the same ids simply go out again with the next read.
        part.unacked = []
        return replies[-1], pending


def entries_of(reply: Any) -> Entries:
    """The entries of a single-stream XREADGROUP reply, in either protocol, as Redis
    sent them or as redis-py parsed them (each entry's fields a dict)."""
    if not reply:
        return []
    # RESP3 answers a map {stream: entries}, RESP2 (and redis-py's parsing) [[stream, entries]].
    entries: list[Any] = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    if next((isinstance(f, dict) for _, f in entries if f is not None), False):
        return [(i, None if f is None else [x for kv in f.items() for x in kv]) for i, f in entries]
    return entries


def _pending_of(summary: Any, consumer: str) -> int:
    """The pending count of ``consumer`` in an XPENDING summary."""
    for row in summary.get("consumers") or []:
        if text(row["name"]) == consumer:
            return int(row["pending"])
    return 0
