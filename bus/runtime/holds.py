"""Traces held back from a partition's flow while the Redis node their work needs is down.

A handler's work for one trace can touch keys outside the partition's slot:
on a cluster, the trace's history and live channel, its thread, its webhook
messages each live on the master owning their own slot. When that one master
is lost, a failing batch would otherwise be retried as a whole, and every
other trace of the partition would wait behind it for as long as the master
is down, though their own nodes are fine.

So a batch whose handler meets a transient Redis error is split by trace:
the traces that go through are acknowledged, the ones that fail are held.
A held trace's entries stay unacknowledged (pending under the partition's
consumer name, so a replica taking the lease over re-reads them) and wait
here, in memory, with the entries of that trace that arrive meanwhile: its
order is kept, as the bus promises per trace, while the rest of the partition
flows on. Each held trace is retried on its own capped exponential backoff;
once it goes through, its entries are acknowledged and it joins the flow.

Holding is bounded (:data:`MAX_HELD_ENTRIES` per partition): past it the
reader stops taking new entries from the partition until a held trace gets
through, which is the whole-partition wait again, but never unbounded memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from bus.parsing import entry_order
from bus.runtime.outage import FIRST_BACKOFF_S, MAX_BACKOFF_S

if TYPE_CHECKING:
    from bus.runtime.batches import Delivery

log = logging.getLogger("bus.runtime.outage")

MAX_HELD_ENTRIES = 20_000
"""Entries one partition holds back at most (events, in memory) before its reader
waits instead of reading on."""
STILL_HELD_EVERY = 10
"""A held trace's failures are logged again every this many tries (with the error
of the latest), so that one that never gets through shows why."""


class _Held:
    __slots__ = ("deliveries", "failures", "retry_at")

    def __init__(self) -> None:
        self.deliveries: dict[str, Delivery] = {}
        """By entry id: an entry re-read from the pending list is not held twice."""
        self.failures = 0
        self.retry_at = 0.0


class TraceHolds:
    """The traces one partition reader holds back, and their entries."""

    __slots__ = ("_held", "_ids", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._held: dict[str, _Held] = {}
        self._ids: set[str] = set()
        """The ids of every entry held, to leave them unacknowledged."""

    def __bool__(self) -> bool:
        return bool(self._held)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._ids

    @property
    def entries(self) -> int:
        """Entries held back (all of them pending in Redis, unacknowledged)."""
        return len(self._ids)

    @property
    def full(self) -> bool:
        return len(self._ids) >= MAX_HELD_ENTRIES

    def due(self) -> bool:
        return bool(self._held) and self.seconds_to_next_retry() == 0.0

    def seconds_to_next_retry(self) -> float:
        """How long until a held trace is due (0 when one is; inf when none is held)."""
        if not self._held:
            return float("inf")
        return max(min(h.retry_at for h in self._held.values()) - time.monotonic(), 0.0)

    def absorb(self, deliveries: Iterable[Delivery]) -> list[Delivery]:
        """Hold the deliveries of held traces; return the others, in order."""
        if not self._held:
            return list(deliveries)
        flowing: list[Delivery] = []
        for delivery in deliveries:
            held = self._held.get(delivery.event.trace_id)
            if held is None:
                flowing.append(delivery)
            else:
                self._add(held, delivery)
        return flowing

    def take_due(self) -> list[tuple[str, list[Delivery]]]:
        """The held traces whose retry is due, each with its entries in stream order;
        they stay held until :meth:`release` (or are held again by :meth:`hold`)."""
        now = time.monotonic()
        due = [(trace, held) for trace, held in self._held.items() if held.retry_at <= now]
        return [(trace, _in_stream_order(held.deliveries.values())) for trace, held in due]

    def hold(self, trace: str, deliveries: Iterable[Delivery], error: BaseException) -> None:
        """Hold ``trace`` (again) after ``error``, with ``deliveries`` among its entries."""
        held = self._held.get(trace)
        if held is None:
            held = self._held[trace] = _Held()
            log.warning(
                "%s: trace %s held back (%s: %s); the partition's other traces flow on",
                self._what,
                trace,
                type(error).__name__,
                error,
            )
        elif held.failures % STILL_HELD_EVERY == 0:
            log.warning(
                "%s: trace %s still held back after %d tries (%s: %s)",
                self._what,
                trace,
                held.failures,
                type(error).__name__,
                error,
            )
        for delivery in deliveries:
            self._add(held, delivery)
        held.retry_at = time.monotonic() + min(FIRST_BACKOFF_S * 2.0**held.failures, MAX_BACKOFF_S)
        held.failures += 1

    def release(self, trace: str) -> list[str]:
        """Let ``trace`` flow again; return the ids of its held entries (to acknowledge)."""
        held = self._held.pop(trace)
        self._ids.difference_update(held.deliveries)
        log.warning(
            "%s: trace %s flows again after %d failed tries", self._what, trace, held.failures
        )
        return list(held.deliveries)

    def _add(self, held: _Held, delivery: Delivery) -> None:
        if delivery.entry_id not in held.deliveries:
            held.deliveries[delivery.entry_id] = delivery
            self._ids.add(delivery.entry_id)


def _in_stream_order(deliveries: Iterable[Delivery]) -> list[Delivery]:
    return sorted(deliveries, key=lambda d: entry_order(d.entry_id))
