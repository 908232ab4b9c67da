"""The consumer runtime: one consumer group read through leased partitions.

A :class:`GroupConsumer` runs inside a worker process (see :mod:`bus.worker`).
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

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bus import deadletter
from bus.errors import EventDecodeError
from bus.events import Event, UnknownEvent, decode
from bus.keys import Keys
from bus.lease import Leases, assign, default_replica_id
from bus.outage import TRANSIENT_ERRORS, Outage
from bus.settings import Settings

log = logging.getLogger(__name__)

IDLE_SLEEP_S = 0.05
"""Pause after an empty read that came back early (fakeredis does not block)."""
MIN_BLOCK_MS = 20


@dataclass(frozen=True, slots=True)
class Delivery:
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


class _LeaseLost(Exception):
    """The partition's lease is no longer ours: drop the batch unacknowledged."""


class _Partition:
    """One owned partition: its lease deadline and its reader task."""

    __slots__ = ("index", "lost", "release", "task", "valid_until")

    def __init__(self, index: int, valid_until: float) -> None:
        self.index = index
        self.valid_until = valid_until
        self.lost = False
        self.release = False
        self.task: asyncio.Task[None] | None = None

    def remaining_s(self) -> float:
        return -1.0 if self.lost else self.valid_until - time.monotonic()

    def check(self) -> None:
        if self.remaining_s() <= 0:
            raise _LeaseLost(self.index)


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
        self._parts: dict[int, _Partition] = {}
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
        part = _Partition(partition, valid_until)
        self._parts[partition] = part
        self.stats.leases_acquired += 1
        part.task = asyncio.create_task(
            self._read_partition(part), name=f"lcbus-{self.group}-p{partition}"
        )

    # -- readers -----------------------------------------------------------

    async def _read_partition(self, part: _Partition) -> None:
        try:
            await self._read_loop(part)
        except _LeaseLost:
            pass
        except Exception:
            # A bug in the runtime or a Redis error we do not expect: the
            # entries stay pending and the next lease holder re-reads them.
            log.exception("reader of %s partition %d failed", self.group, part.index)
        finally:
            del self._parts[part.index]
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._leases.release(part.index)
            self._wake.set()

    async def _read_loop(self, part: _Partition) -> None:
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

    async def _read(
        self, part: _Partition, stream: str, consumer: str, cursor: str
    ) -> tuple[list[tuple[bytes, dict[bytes, bytes] | None]], str]:
        count = self._settings.read_count
        if cursor != ">":
            reply = await self._redis.xreadgroup(
                self.group, consumer, {stream: cursor}, count=count
            )
            entries = _entries(reply)
            if not entries:
                return [], ">"
            last = entries[-1][0]
            return entries, last.decode() if isinstance(last, bytes) else str(last)
        # Never block past the lease deadline: a read served after the lease
        # moved would park new entries in a name another replica now owns.
        budget_ms = int((part.remaining_s() - self._margin_s) * 1000)
        block_ms = min(self._settings.read_block_ms, budget_ms)
        if block_ms < MIN_BLOCK_MS:
            await asyncio.sleep(max(block_ms, MIN_BLOCK_MS) / 1000)
            return [], ">"
        started = time.monotonic()
        reply = await self._redis.xreadgroup(
            self.group, consumer, {stream: ">"}, count=count, block=block_ms
        )
        entries = _entries(reply)
        if not entries and time.monotonic() - started < block_ms / 2000:
            await asyncio.sleep(IDLE_SLEEP_S)
        return entries, ">"

    async def _process(
        self, part: _Partition, entries: list[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> None:
        deliveries: list[Delivery] = []
        payloads: dict[str, bytes] = {}
        dead: list[dict[bytes, bytes]] = []
        ack: list[bytes] = []
        for raw_id, fields in entries:
            ack.append(raw_id)
            entry_id = raw_id.decode()
            if fields is None:
                self.stats.trimmed += 1
                continue
            payload = fields.get(b"e", b"")
            try:
                event = decode(payload)
            except EventDecodeError as exc:
                self.stats.undecodable += 1
                dead.append(self._dead(deadletter.REASON_UNDECODABLE, exc, part, entry_id, payload))
                continue
            if isinstance(event, UnknownEvent):
                self.stats.unknown_skipped += 1
                continue
            deliveries.append(Delivery(entry_id, part.index, event))
            payloads[entry_id] = payload
        if deliveries:
            for delivery, error in await self._handle(part, deliveries):
                payload = payloads[delivery.entry_id]
                reason = deadletter.REASON_HANDLER_FAILED
                dead.append(self._dead(reason, error, part, delivery.entry_id, payload))
        # Dead letters keep stream order, whichever way each one failed.
        dead.sort(key=lambda fields: _id_order(fields[b"entry_id"]))
        part.check()
        await self._settle(part, ack, dead)

    def _dead(
        self, reason: str, exc: BaseException, part: _Partition, entry_id: str, payload: bytes
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
        self, part: _Partition, ack: list[bytes], dead: list[dict[bytes, bytes]]
    ) -> None:
        # Dead letters are written before the ack: a crash in between leaves
        # a duplicate dead letter, never a lost entry.
        async with self._redis.pipeline(transaction=False) as pipe:
            for fields in dead:
                pipe.xadd(self._keys.dlq(self.group), fields)  # type: ignore[arg-type]
            pipe.xack(self._keys.events(part.index), self.group, *ack)
            await pipe.execute()
        self.stats.dead_lettered += len(dead)
        self.stats.batches += 1

    async def _handle(
        self, part: _Partition, deliveries: list[Delivery]
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

    async def _attempt(self, part: _Partition, batch: list[Delivery]) -> BaseException | None:
        error: BaseException | None = None
        for attempt in range(self._settings.max_attempts):
            part.check()
            try:
                await self._handler(batch)
            except TRANSIENT_ERRORS:
                # Redis trouble inside the handler is an outage, not poison:
                # the reader backs off and re-reads the batch from pending.
                raise
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


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
