"""Reading one leased partition with ``XREADGROUP`` under its consumer name ``p{partition}``.

A reader first re-reads the name's pending entries (cursor ``0``: whatever a
dead owner had read but not acknowledged), then new ones (cursor ``>``). The
acknowledgement of a batch travels with a later read: the next one, or, when a
busy partition's next batch was read while this one was handled, the one after
that. The lease deadline is
checked before every read and no blocking read outlasts it, so a read served
after the lease moved cannot park entries under a name another replica owns.

On a standalone Redis each read is packed by hand and its replies stay as Redis
sent them (:mod:`bus.runtime.roundtrip`), on a connection of the partition's own
(:class:`~bus.runtime.resp_link.RespLink`, where the client's options allow one);
a cluster client reads through its pipeline, and :func:`entries_of` reads both
shapes.
"""

from __future__ import annotations

import asyncio
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
from bus.runtime.resp_link import RespLink
from bus.runtime.roundtrip import command, round_trip, xack, xreadgroup
from bus.settings import Settings

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.05
"""Pause after an empty read that came back early (a server whose blocking read does
not block, such as plain fakeredis 2.40)."""
MIN_BLOCK_MS = 20
READ_AHEAD_AT = 8
"""A batch this big (or full, or after a read ahead that found entries) says entries come
faster than they are handled: the next read goes out while this batch is handled."""


async def ensure_group(redis: aioredis.Redis, keys: Keys, group: str, partition: int) -> None:
    """Create ``group`` on the partition's stream (and the stream) unless it exists."""
    # Start id 0: events published before any worker of the group ever
    # ran are still delivered.
    try:
        await redis.xgroup_create(keys.events(partition), group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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
        # A cluster client routes by slot: it reads through its pipeline.
        self._by_hand = not is_cluster_client(redis)
        self._group_bytes = group.encode()
        self._settings = settings
        self._keys = Keys(settings.prefix, settings.partitions)
        self._group = group
        self._processor = BatchProcessor(
            redis=redis, settings=settings, group=group, handler=handler, stats=stats
        )
        self._stats = stats
        self._margin_s = margin_s
        self._stopping = stopping
        self._links: dict[int, RespLink] = {}
        """Each running partition's own connection for its reads (standalone Redis)."""

    async def run(self, part: HeldPartition) -> None:
        """Read and process until the consumer stops or the partition is to be released."""
        link = RespLink.for_client(self._redis) if self._by_hand else None
        if link is not None:
            self._links[part.index] = link
        try:
            await self._run(part)
        finally:
            if link is not None:
                link.close()
                if self._links.get(part.index) is link:
                    del self._links[part.index]

    async def _run(self, part: HeldPartition) -> None:
        stream = self._keys.events(part.index)
        consumer = f"p{part.index}"
        outage = Outage(f"consumer {self._group} partition {part.index}", self._stats)
        # "0" re-reads this consumer name's pending entries, ">" reads new ones.
        cursor = "0"
        entries: Entries = []  # read, not yet handled: handled even when stopping
        while entries or not (self._stopping() or part.release):
            try:
                if entries:
                    entries, cursor = await self._process_reading_ahead(
                        part, stream, consumer, entries, cursor
                    )
                    outage.recovered()
                    continue
                if part.holds.due():
                    # Nothing new read, and a held trace's retry is due.
                    await self._processor.process(part, [])
                part.check()
                entries, cursor = await self._read(part, stream, consumer, cursor)
                if not entries and cursor == ">" and await self._parked(part, stream, consumer):
                    cursor = "0"
                outage.recovered()
            except TRANSIENT_ERRORS as exc:  # before ResponseError: CLUSTERDOWN is one
                # Whatever we read but did not ack is still pending: start over from it.
                entries, cursor = [], "0"
                await asyncio.sleep(min(outage.failed(exc), max(part.remaining_s(), 0.01)))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (Redis restarted empty, key deleted).
                await ensure_group(self._redis, self._keys, self._group, part.index)
                entries, cursor = [], "0"

    async def _process_reading_ahead(
        self, part: HeldPartition, stream: str, consumer: str, entries: Entries, cursor: str
    ) -> tuple[Entries, str]:
        """Process ``entries`` while the next batch is being read; return that batch.

        The read goes out before the handler starts, so Redis serves it (on
        another core) while this process decodes and handles: a busy partition
        costs the handler's time or the read's, not both. It does not block
        (an idle partition is read by :meth:`_read`, which acknowledges what
        was just handled first) and acknowledges the batch before this one;
        this one's acknowledgement goes with the read after it. A replay of
        pending entries (cursor ``0``…), a reader about to stop and one holding
        back all the entries it may (:mod:`bus.runtime.holds`) read nothing ahead.

        Nor does a quiet partition: a batch of a few entries (not full), after a read ahead
        that found none (or none made), means the stream was drained when read;
        a read ahead would come back empty, and is one round trip of three
        per batch then. The blocking read after the batch gets what arrived
        meanwhile at once.
        """
        busy_at = min(READ_AHEAD_AT, self._settings.read_count)  # a full batch: more may wait
        quiet = len(entries) < busy_at and not part.reading_ahead
        if cursor != ">" or quiet or self._stopping() or part.release or part.holds.full:
            part.reading_ahead = False
            await self._processor.process(part, entries)
            return [], cursor
        ahead = asyncio.create_task(self._read_ahead(part, stream, consumer, held=len(entries)))
        await asyncio.sleep(0)  # the read is sent before the handler runs
        try:
            await self._processor.process(part, entries)
        except BaseException:
            # No read is left in flight: its entries stay pending, re-read from "0".
            await asyncio.wait([ahead])
            if not ahead.cancelled():
                ahead.exception()  # retrieved: the processing error is the one to raise
            raise
        return await ahead

    async def _read_ahead(
        self, part: HeldPartition, stream: str, consumer: str, *, held: int
    ) -> tuple[Entries, str]:
        """A read that does not block, while ``held`` entries read before are handled."""
        part.check()
        new = await self._read_new(part, stream, consumer, None, in_hand=held)
        part.reading_ahead = bool(new)
        return ([], "0") if new is None else (new, ">")

    async def flush_acks(self, part: HeldPartition) -> None:
        """Acknowledge the last batch now instead of with the next read."""
        if acked := len(part.unacked):
            await self._redis.xack(self._keys.events(part.index), self._group, *part.unacked)
            del part.unacked[:acked]

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
        self,
        part: HeldPartition,
        stream: str,
        consumer: str,
        block: int | None,
        *,
        in_hand: int = 0,
    ) -> Entries | None:
        """New entries, or None when older ones wait, parked, in this name's pending list.

        A read whose reply was lost (a socket timeout, a broken connection:
        Redis stalled, or this process did) can still be served after the
        next read, parking the entries it took while later ones are handed
        out. The pending count read right after every read tells: if this
        name holds more than it just received, the caller re-reads the whole
        pending list, which returns the parked entries first, in stream order.
        Still pending, and so not parked: the ``in_hand`` entries of a batch being
        handled while this read went ahead, and those of held-back traces.
        """
        reply, pending = await self._xread(part, stream, consumer, ">", block, check=True)
        entries = entries_of(reply)
        if entries and pending > in_hand + len(entries) + part.holds.entries:
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
        acked = len(part.unacked)
        if self._by_hand:
            replies = await self._round_trip(part, stream, consumer, cursor, block, check)
        elif not acked and not check:
            reply = await self._redis.xreadgroup(
                self._group, consumer, {stream: cursor}, count=count, block=block
            )
            return reply, -1
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                if acked:
                    pipe.xack(stream, self._group, *part.unacked)
                pipe.xreadgroup(self._group, consumer, {stream: cursor}, count=count, block=block)
                if check:
                    pipe.xpending(stream, self._group)
                replies = await pipe.execute()
        pending = _pending_of(replies.pop(), consumer) if check else -1
        # Kept until here on purpose: XACK is idempotent, so after an error
        # the same ids simply go out again with the next read. Ids a batch
        # handled meanwhile (this read went ahead of it) stay for the next.
        del part.unacked[:acked]
        return replies[-1], pending

    async def _round_trip(
        self,
        part: HeldPartition,
        stream: str,
        consumer: str,
        cursor: str,
        block: int | None,
        check: bool,
    ) -> list[Any]:
        """The commands of :meth:`_xread`, packed by hand (standalone Redis)."""
        key, group = stream.encode(), self._group_bytes
        commands = [xack(key, group, part.unacked)] if part.unacked else []
        count = self._settings.read_count
        commands.append(xreadgroup(key, group, consumer.encode(), cursor.encode(), count, block))
        if check:
            commands.append(command(b"XPENDING", key, group))
        link = self._links.get(part.index)
        if link is not None:
            return await link.round_trip(commands, len(commands), blocking=block is not None)
        return await round_trip(self._redis, commands, len(commands))


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
    """The pending count of ``consumer`` in an XPENDING summary, as Redis sent it
    (``[count, min, max, [[name, count], …]]``) or as redis-py parsed it."""
    if isinstance(summary, dict):
        rows = [(row["name"], row["pending"]) for row in summary.get("consumers") or []]
    else:
        rows = summary[3] or []
    for name, pending in rows:
        if text(name) == consumer:
            return int(pending)
    return 0
