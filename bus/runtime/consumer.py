"""The consumer runtime: one consumer group read through leased partitions.

A :class:`GroupConsumer` runs inside a worker process (see :mod:`bus.runtime.worker`).
Its coordinator task heartbeats the replica into the group's membership,
computes which partitions this replica should own, takes and renews their
leases and releases the ones it should give up. Each owned partition gets a
reader task that reads with ``XREADGROUP`` under the fixed consumer name
``p{partition}``: a new owner first re-reads that name's pending entries, so
whatever a dead owner had read but not acknowledged is handled again, in order.

Entries are acknowledged only after the handler returned. A reader checks its
local lease deadline (kept on the monotonic clock with a safety margin, so it
ends before the Redis key expires) before every read, before handing a batch to
the handler and before acknowledging, so a replica that lost its lease stops
touching the partition at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bus.errors import EventDecodeError, EventRejected
from bus.events import Event, UnknownEvent, decode
from bus.keys import Keys
from bus.runtime import deadletter
from bus.runtime.lease import HeldPartition, LeaseLost, Leases, assign, default_replica_id
from bus.runtime.outage import TRANSIENT_ERRORS, Outage
from bus.settings import Settings

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.05
"""Pause after an empty read that came back early (fakeredis does not block)."""
MIN_BLOCK_MS = 20


class Delivery(msgspec.Struct, frozen=True):
    """One entry for a handler. A Struct: about a sixth of a frozen dataclass's
    cost to build, once per entry on the consumer's hot path."""

    entry_id: str
    partition: int
    event: Event


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]
"""Called with one partition's entries in stream order; returning acknowledges them."""


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer since it started (exported as Prometheus counters)."""

    processed: int = 0
    failed: int = 0
    """Handler calls that raised (each retry counts)."""
    dead_lettered: int = 0
    undecodable: int = 0
    unknown_skipped: int = 0
    trimmed: int = 0
    """Pending entries whose payload the stream had already trimmed away."""
    batches: int = 0
    leases_acquired: int = 0
    leases_lost: int = 0
    redis_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class GroupConsumer:
    """Reads one consumer group's partitions that this replica holds leases on."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        settings: Settings,
        group: str,
        handler: BatchHandler,
        replica_id: str | None = None,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._keys = Keys(settings.prefix)
        self.group = group
        self._handler = handler
        self.replica_id = replica_id or default_replica_id()
        self.stats = ConsumerStats()
        self._leases = Leases(
            redis=redis,
            keys=self._keys,
            group=group,
            replica_id=self.replica_id,
            ttl_ms=settings.lease_ttl_ms,
        )
        # Stop reading before Redis could expire the key: renewals are timed
        # from before the request was sent, and the margin absorbs latency.
        self._margin_s = max(settings.lease_ttl_ms * 0.1, 50) / 1000
        self._parts: dict[int, HeldPartition] = {}
        self._coordinator: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    @property
    def owned_partitions(self) -> frozenset[int]:
        return frozenset(p for p, part in self._parts.items() if part.remaining_s() > 0)

    async def __aenter__(self) -> GroupConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the group on every partition, then start coordinating."""
        if self._coordinator is not None:
            return
        for p in range(self._settings.partitions):
            await self._ensure_group(p)
        self._coordinator = asyncio.create_task(self._coordinate(), name=f"lcbus-{self.group}")

    async def aclose(self) -> None:
        """Finish and acknowledge the batches in hand, release leases, leave the group."""
        if self._coordinator is None or self._stopping:
            return
        self._stopping = True
        self._wake.set()
        # Leaving first lets the other replicas claim each partition the
        # moment its reader below lets go of the lease.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._leases.leave()
        while readers := [part.task for part in self._parts.values() if part.task is not None]:
            await asyncio.gather(*readers, return_exceptions=True)
        self._coordinator.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._coordinator
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._leases.leave()

    async def _ensure_group(self, partition: int) -> None:
        # Start id 0: events published before any worker of the group ever
        # ran are still delivered.
        try:
            await self._redis.xgroup_create(
                self._keys.events(partition), self.group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- coordinator -------------------------------------------------------

    async def _coordinate(self) -> None:
        outage = Outage(f"consumer {self.group} coordinator", self.stats)
        while True:
            try:
                await self._coordinate_once()
                outage.recovered()
                delay = self._settings.heartbeat_interval_s
            except TRANSIENT_ERRORS as exc:
                delay = outage.failed(exc)
            # Readers keep their leases alive through us until they are done.
            if self._stopping and not self._parts:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _coordinate_once(self) -> None:
        started = time.monotonic()
        await self._renew(started)
        if self._stopping:
            return
        members = await self._leases.heartbeat()
        wanted = assign(self._settings.partitions, members, self.replica_id)
        for p, part in self._parts.items():
            if p not in wanted:
                part.release = True
        for p in sorted(wanted - self._parts.keys()):
            started = time.monotonic()
            if not await self._leases.acquire(p):
                continue
            if self._stopping:  # aclose() began while we were asking
                await self._leases.release(p)
                return
            self._start_reader(p, started)

    async def _renew(self, started: float) -> None:
        results = await self._leases.renew(list(self._parts))
        for p, ok in results.items():
            part = self._parts.get(p)
            if part is None:
                continue
            if ok:
                part.valid_until = started + self._settings.lease_ttl_ms / 1000 - self._margin_s
            elif not part.lost:
                part.lost = True
                self.stats.leases_lost += 1
                log.warning("lost lease on %s partition %d", self.group, p)

    def _start_reader(self, partition: int, started: float) -> None:
        valid_until = started + self._settings.lease_ttl_ms / 1000 - self._margin_s
        part = HeldPartition(partition, valid_until)
        self._parts[partition] = part
        self.stats.leases_acquired += 1
        part.task = asyncio.create_task(
            self._read_partition(part), name=f"lcbus-{self.group}-p{partition}"
        )

    # -- readers -----------------------------------------------------------

    async def _read_partition(self, part: HeldPartition) -> None:
        try:
            await self._read_loop(part)
            part.check()
            await self._flush_acks(part)
        except LeaseLost:
            pass
        except TRANSIENT_ERRORS:
            pass  # unacked entries stay pending for the next lease holder
        except Exception:
            # A bug in the runtime or a Redis error we do not expect: the
            # entries stay pending and the next lease holder re-reads them.
            log.exception("reader of %s partition %d failed", self.group, part.index)
        finally:
            del self._parts[part.index]
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._leases.release(part.index)
            self._wake.set()

    async def _read_loop(self, part: HeldPartition) -> None:
        stream = self._keys.events(part.index)
        consumer = f"p{part.index}"
        outage = Outage(f"consumer {self.group} partition {part.index}", self.stats)
        # "0" re-reads this consumer name's pending entries, ">" reads new ones.
        cursor = "0"
        while not (self._stopping or part.release):
            part.check()
            try:
                entries, cursor = await self._read(part, stream, consumer, cursor)
                if entries:
                    await self._process(part, entries)
                elif cursor == ">" and await self._parked(part, stream, consumer):
                    cursor = "0"
                outage.recovered()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # The stream or group vanished (Redis restarted empty, key deleted).
                await self._ensure_group(part.index)
                cursor = "0"
            except TRANSIENT_ERRORS as exc:
                # Whatever we read but did not ack is still pending: start over from it.
                cursor = "0"
                await asyncio.sleep(min(outage.failed(exc), max(part.remaining_s(), 0.01)))

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
        summary: Any = await self._redis.xpending(stream, self.group)
        if _pending_of(summary, consumer) > len(part.unacked):
            log.warning("re-reading parked entries of %s partition %d", self.group, part.index)
            return True
        return False

    async def _read(
        self, part: HeldPartition, stream: str, consumer: str, cursor: str
    ) -> tuple[list[tuple[bytes, dict[bytes, bytes] | None]], str]:
        if cursor != ">":
            reply, _ = await self._xread(part, stream, consumer, cursor, None)
            entries = _entries(reply)
            if not entries:
                return [], ">"
            last = entries[-1][0]
            return entries, last.decode() if isinstance(last, bytes) else str(last)
        if self._settings.read_block_ms <= 0:
            # Polling mode, for servers whose blocking XREADGROUP misbehaves
            # (fakeredis 2.40 moves entries to the pending list but answers empty).
            new = await self._read_new(part, stream, consumer, None)
            if new is None:
                return [], "0"
            if not new:
                await asyncio.sleep(IDLE_SLEEP_S)
            return new, ">"
        # Never block past the lease deadline: a read served after the lease
        # moved would park new entries in a name another replica now owns.
        budget_ms = int((part.remaining_s() - self._margin_s) * 1000)
        block_ms = min(self._settings.read_block_ms, budget_ms)
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
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]] | None:
        """New entries, or None when older ones wait, parked, in this name's pending list.

        A read whose reply was lost (a socket timeout, a broken connection:
        Redis stalled, or this process did) can still be served after the
        next read, parking the entries it took while later ones are handed
        out. The pending count read right after every read tells: if this
        name holds more than it just received, the caller re-reads the whole
        pending list, which returns the parked entries first, in stream order.
        """
        reply, pending = await self._xread(part, stream, consumer, ">", block, check=True)
        entries = _entries(reply)
        if entries and pending > len(entries):
            log.warning("re-reading parked entries of %s partition %d", self.group, part.index)
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
            reply = await self._redis.xreadgroup(
                self.group, consumer, {stream: cursor}, count=count, block=block
            )
            return reply, -1
        async with self._redis.pipeline(transaction=False) as pipe:
            if part.unacked:
                pipe.xack(stream, self.group, *part.unacked)
            pipe.xreadgroup(self.group, consumer, {stream: cursor}, count=count, block=block)
            if check:
                pipe.xpending(stream, self.group)
            replies = await pipe.execute()
        pending = _pending_of(replies.pop(), consumer) if check else -1
        # Kept until here on purpose: XACK is idempotent, so after an error
        # the same ids simply go out again with the next read.
        part.unacked = []
        return replies[-1], pending

    async def _flush_acks(self, part: HeldPartition) -> None:
        if part.unacked:
            await self._redis.xack(self._keys.events(part.index), self.group, *part.unacked)
            part.unacked = []

    async def _process(
        self, part: HeldPartition, entries: list[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> None:
        deliveries, dead = self._decode(part, entries)
        if deliveries:
            failures = await self._handle(part, deliveries)
            if failures:
                # Only a failure needs the payloads back (for the dead letter).
                payloads = {i.decode(): f.get(b"e", b"") for i, f in entries if f is not None}
                for delivery, error in failures:
                    payload = payloads[delivery.entry_id]
                    reason = (
                        deadletter.REASON_REJECTED
                        if isinstance(error, EventRejected)
                        else deadletter.REASON_HANDLER_FAILED
                    )
                    dead.append(self._dead(reason, error, part, delivery.entry_id, payload))
                # Dead letters keep stream order, whichever way each one failed.
                dead.sort(key=lambda fields: _id_order(fields[b"entry_id"]))
        part.check()
        await self._settle(part, [entry_id for entry_id, _ in entries], dead)

    def _decode(
        self, part: HeldPartition, entries: list[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> tuple[list[Delivery], list[dict[bytes, bytes]]]:
        """Deliveries for the handler, and dead letters for what is not a bus event."""
        deliveries: list[Delivery] = []
        dead: list[dict[bytes, bytes]] = []
        index = part.index
        for raw_id, fields in entries:
            if fields is None:
                self.stats.trimmed += 1
                continue
            payload = fields.get(b"e", b"")
            try:
                event = decode(payload)
            except EventDecodeError as exc:
                self.stats.undecodable += 1
                reason = deadletter.REASON_UNDECODABLE
                dead.append(self._dead(reason, exc, part, raw_id.decode(), payload))
                continue
            if type(event) is UnknownEvent:
                self.stats.unknown_skipped += 1
                continue
            deliveries.append(Delivery(raw_id.decode(), index, event))
        return deliveries, dead

    def _dead(
        self, reason: str, exc: BaseException, part: HeldPartition, entry_id: str, payload: bytes
    ) -> dict[bytes, bytes]:
        log.warning(
            "dead-lettering %s entry %s of partition %d: %s",
            self.group,
            entry_id,
            part.index,
            deadletter.describe_error(exc),
        )
        return deadletter.dead_letter_fields(
            reason=reason,
            error=deadletter.describe_error(exc),
            partition=part.index,
            entry_id=entry_id,
            payload=payload,
        )

    async def _settle(
        self, part: HeldPartition, ack: list[bytes], dead: list[dict[bytes, bytes]]
    ) -> None:
        # Dead letters are written before the ack: a crash in between leaves
        # a duplicate dead letter, never a lost entry.
        if not dead:
            part.unacked = ack
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for fields in dead:
                    pipe.xadd(self._keys.dlq(self.group), fields)  # type: ignore[arg-type]
                pipe.xack(self._keys.events(part.index), self.group, *ack)
                await pipe.execute()
        self.stats.dead_lettered += len(dead)
        self.stats.batches += 1

    async def _handle(
        self, part: HeldPartition, deliveries: list[Delivery]
    ) -> list[tuple[Delivery, BaseException]]:
        """Run the handler with retries; return the deliveries that keep failing."""
        error = await self._attempt(part, deliveries)
        if error is None:
            return []
        if len(deliveries) == 1:
            return [(deliveries[0], error)]
        # Isolate the culprit: one by one, in order, so the rest flow on.
        failures: list[tuple[Delivery, BaseException]] = []
        for delivery in deliveries:
            error = await self._attempt(part, [delivery])
            if error is not None:
                failures.append((delivery, error))
        return failures

    async def _attempt(self, part: HeldPartition, batch: list[Delivery]) -> BaseException | None:
        error: BaseException | None = None
        for attempt in range(self._settings.max_attempts):
            part.check()
            try:
                await self._handler(batch)
            except TRANSIENT_ERRORS:
                # Redis trouble inside the handler is an outage, not poison:
                # the reader backs off and re-reads the batch from pending.
                raise
            except EventRejected as exc:
                # The same input is refused the same way: no retry.
                self.stats.failed += 1
                return exc
            except Exception as exc:
                self.stats.failed += 1
                error = exc
                if attempt + 1 < self._settings.max_attempts:
                    backoff = self._settings.retry_backoff_ms / 1000 * 2**attempt
                    await asyncio.sleep(min(backoff, 2.0))
                continue
            self.stats.processed += len(batch)
            return None
        return error


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of a single-stream XREADGROUP reply (the client speaks RESP2)."""
    if not reply:
        return []
    return list(reply[0][1])


def _pending_of(summary: Any, consumer: str) -> int:
    """The pending count of ``consumer`` in an XPENDING summary."""
    for row in summary.get("consumers") or []:
        if _text(row["name"]) == consumer:
            return int(row["pending"])
    return 0


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
