"""What becomes of one batch a partition reader took: handled, retried or dead-lettered.

The handler gets the batch's bus events in stream order. An entry that is not
a bus event goes to the group's dead letters at once; an unknown event type is
skipped. A batch whose handler raises is retried with backoff, then split into
single entries so that only the culprits are dead-lettered and the rest flow on.
Dead letters are written before the acknowledgement, so nothing is ever lost.
A batch whose handler meets a transient Redis error is handled again trace by
trace, and the traces that still fail are held back (:mod:`bus.runtime.holds`):
one lost cluster node stops only the traces whose work needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgspec
import redis.asyncio as aioredis

from bus.errors import EventDecodeError, EventRejected
from bus.events import Event, UnknownEvent, decode, encode
from bus.keys import ENTRY_FIELD, Keys
from bus.parsing import entry_order
from bus.runtime import deadletter
from bus.runtime.lease import HeldPartition
from bus.runtime.outage import TRANSIENT_ERRORS
from bus.settings import Settings

log = logging.getLogger(__name__)

Fields = list[bytes]
"""An entry's fields as Redis sends them: name, value, name, value…"""
Entries = list[tuple[bytes, Fields | None]]
"""Stream entries as XREADGROUP returns them; the fields are None once trimmed away."""

_event_decoder = msgspec.msgpack.Decoder(Event)
"""The typed decoder of :mod:`bus.events`, called directly: the hot path skips the
wrapper's call and only a payload it refuses goes through :func:`bus.events.decode`
(unknown types, errors)."""


class Delivery(msgspec.Struct, frozen=True, gc=False):
    """One entry for a handler. A Struct: about a sixth of a frozen dataclass's
    cost to build, once per entry on the consumer's hot path. Untracked by the
    cyclic collector (frozen, it cannot be part of a cycle): one object per entry
    fewer to count towards, and to scan in, the collections a batch triggers."""

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


class BatchProcessor:
    """Hands a group's batches to its handler and settles them (ack and dead letters)."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        settings: Settings,
        group: str,
        handler: BatchHandler,
        stats: ConsumerStats,
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._keys = Keys(settings.prefix, settings.partitions)
        self._group = group
        self._handler = handler
        self._stats = stats

    async def process(self, part: HeldPartition, entries: Entries) -> None:
        """Handle ``entries`` (and the held traces now due) and leave the ids to
        acknowledge in ``part.unacked``; a held trace's entries stay unacknowledged."""
        deliveries, dead = self._decode(part, entries)
        holds = part.holds
        due: list[tuple[str, list[Delivery]]] = []
        if holds:
            deliveries = holds.absorb(deliveries)
            due = holds.take_due()
            # A due trace's entries come first: they are older than any of the batch.
            deliveries = [d for _, held in due for d in held] + deliveries
        held_now: set[str] = set()
        if deliveries:
            failures = await self._handle_or_hold(part, deliveries, held_now)
            if failures:
                # Only a failure needs the payloads back (for the dead letter).
                payloads = {i.decode(): payload_of(f) for i, f in entries if f is not None}
                for delivery, error in failures:
                    payload = payloads.get(delivery.entry_id) or encode(delivery.event)
                    reason = (
                        deadletter.REASON_REJECTED
                        if isinstance(error, EventRejected)
                        else deadletter.REASON_HANDLER_FAILED
                    )
                    dead.append(self._dead(reason, error, part, delivery.entry_id, payload))
                # Dead letters keep stream order, whichever way each one failed.
                dead.sort(key=lambda fields: entry_order(fields[b"entry_id"]))
        part.check()
        if not holds and not due:
            ack = [entry_id for entry_id, _ in entries]
        else:
            ack = [entry_id for entry_id, _ in entries if entry_id.decode() not in holds]
            for trace, _ in due:
                if trace not in held_now:
                    ack += [entry_id.encode() for entry_id in holds.release(trace)]
        await self._settle(part, ack, dead)

    async def _handle_or_hold(
        self, part: HeldPartition, deliveries: list[Delivery], held_now: set[str]
    ) -> list[tuple[Delivery, BaseException]]:
        """:meth:`_handle`, and when Redis fails under it, again trace by trace: the
        traces that still fail are held (:mod:`bus.runtime.holds`) and added to
        ``held_now``, the rest go through."""
        try:
            return await self._handle(part, deliveries)
        except TRANSIENT_ERRORS as exc:
            self._stats.redis_errors += 1
            error = exc
        groups: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            groups.setdefault(delivery.event.trace_id, []).append(delivery)
        if len(groups) == 1:
            ((trace, group),) = groups.items()
            part.holds.hold(trace, group, error)
            held_now.add(trace)
            return []
        failures: list[tuple[Delivery, BaseException]] = []
        for trace, group in groups.items():
            try:
                failures += await self._handle(part, group)
            except TRANSIENT_ERRORS as exc:
                self._stats.redis_errors += 1
                part.holds.hold(trace, group, exc)
                held_now.add(trace)
        return failures

    def _decode(
        self, part: HeldPartition, entries: Entries
    ) -> tuple[list[Delivery], list[dict[bytes, bytes]]]:
        """Deliveries for the handler, and dead letters for what is not a bus event."""
        index = part.index
        decode_event = _event_decoder.decode
        # The usual batch: every entry the bus's one field, every payload an event
        # this version knows (the typed decoder refuses unknown types). Anything
        # else (a trimmed entry, other fields, a payload it refuses) raises, and
        # the batch is taken entry by entry below.
        try:
            if all(fields[0] == ENTRY_FIELD for _, fields in entries):  # type: ignore[index]
                return [
                    Delivery(raw_id.decode(), index, decode_event(fields[1]))  # type: ignore[index]
                    for raw_id, fields in entries
                ], []
        except (TypeError, IndexError, msgspec.DecodeError):
            pass
        deliveries: list[Delivery] = []
        dead: list[dict[bytes, bytes]] = []
        for raw_id, fields in entries:
            if fields is None:
                self._stats.trimmed += 1
                continue
            # The bus writes one field: no lookup for it in the usual case.
            payload = fields[1] if fields and fields[0] == ENTRY_FIELD else payload_of(fields)
            try:
                event = decode_event(payload)
            except msgspec.DecodeError:
                try:
                    event = decode(payload)
                except EventDecodeError as exc:
                    self._stats.undecodable += 1
                    reason = deadletter.REASON_UNDECODABLE
                    dead.append(self._dead(reason, exc, part, raw_id.decode(), payload))
                    continue
            if type(event) is UnknownEvent:
                self._stats.unknown_skipped += 1
                continue
            deliveries.append(Delivery(raw_id.decode(), index, event))
        return deliveries, dead

    def _dead(
        self, reason: str, exc: BaseException, part: HeldPartition, entry_id: str, payload: bytes
    ) -> dict[bytes, bytes]:
        log.warning(
            "dead-lettering %s entry %s of partition %d: %s",
            self._group,
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
            part.unacked.extend(ack)
        else:
            async with self._redis.pipeline(transaction=False) as pipe:
                for fields in dead:
                    pipe.xadd(self._keys.dlq(self._group), fields)  # type: ignore[arg-type]
                pipe.xack(self._keys.events(part.index), self._group, *ack)
                await pipe.execute()
        self._stats.dead_lettered += len(dead)
        self._stats.batches += 1

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
                self._stats.failed += 1
                return exc
            except Exception as exc:
                self._stats.failed += 1
                error = exc
                if attempt + 1 < self._settings.max_attempts:
                    backoff = self._settings.retry_backoff_ms / 1000 * 2**attempt
                    await asyncio.sleep(min(backoff, 2.0))
                continue
            self._stats.processed += len(batch)
            return None
        return error


def payload_of(fields: Fields) -> bytes:
    """The event payload among an entry's fields (empty when the entry has none)."""
    for at in range(0, len(fields) - 1, 2):
        if fields[at] == ENTRY_FIELD:
            return fields[at + 1]
    return b""
