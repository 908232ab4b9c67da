"""The consumer runtime: one consumer group read through leased partitions.

A :class:`GroupConsumer` runs inside a worker process (see :mod:`bus.runtime.worker`).
Its coordinator task heartbeats the replica into the group's membership,
computes which partitions this replica should own, takes and renews their
leases and releases the ones it should give up. Each owned partition gets a
reader task (:mod:`bus.runtime.reader`) that reads with ``XREADGROUP`` under
the fixed consumer name ``p{partition}``: a new owner first re-reads that
name's pending entries, so whatever a dead owner had read but not acknowledged
is handled again, in order. :mod:`bus.runtime.batches` hands each batch to the
handler, with retries and dead letters.

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

import redis.asyncio as aioredis

from bus.keys import Keys
from bus.runtime.batches import BatchHandler, ConsumerStats, Delivery
from bus.runtime.lease import HeldPartition, LeaseLost, Leases, assign, default_replica_id
from bus.runtime.outage import TRANSIENT_ERRORS, Outage
from bus.runtime.reader import PartitionReader, ensure_group
from bus.settings import Settings

__all__ = ["BatchHandler", "ConsumerStats", "Delivery", "GroupConsumer"]

log = logging.getLogger(__name__)


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
        self._keys = Keys(settings.prefix, settings.partitions)
        self.group = group
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
        self._reader = PartitionReader(
            redis=redis,
            settings=settings,
            group=group,
            handler=handler,
            stats=self.stats,
            margin_s=self._margin_s,
            stopping=lambda: self._stopping,
        )
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
            await ensure_group(self._redis, self._keys, self.group, p)
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

    # -- coordinator -------------------------------------------------------

    async def _coordinate(self) -> None:
        outage = Outage(f"consumer {self.group} coordinator", self.stats)
        while True:
            try:
                await self._coordinate_once()
                outage.recovered()
                delay = self._settings.heartbeat_interval_s
            except TRANSIENT_ERRORS as exc:
                # No longer than a heartbeat: on a cluster the node that failed may
                # hold only the membership or some leases, and the leases on the
                # other masters must still be renewed in time.
                delay = min(outage.failed(exc), self._settings.heartbeat_interval_s)
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
        part = HeldPartition(partition, valid_until, f"consumer {self.group} partition {partition}")
        self._parts[partition] = part
        self.stats.leases_acquired += 1
        part.task = asyncio.create_task(
            self._read_partition(part), name=f"lcbus-{self.group}-p{partition}"
        )

    async def _read_partition(self, part: HeldPartition) -> None:
        try:
            await self._reader.run(part)
            part.check()
            await self._reader.flush_acks(part)
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
