"""In-process waiting for an endpoint's own concurrency limit.

Redis holds the limits that count (:mod:`bus.webhooks.limits`); this is the
worker process's cheap first line. Each endpoint gets a local semaphore as
wide as its ``max_concurrency``, so a burst of attempts for one endpoint
queues here, in order, and each takes its Redis slot the moment a local one
frees, instead of being turned away by Redis and deferred with backoff as a
new arq job (a round of job churn per refusal, and seconds of added latency).

Waiting holds an arq job slot, so it is bounded twice: at most
``max_waiting`` attempts of the process wait at any time (the rest are
deferred as before), and none waits longer than ``wait_s``. With
``max_waiting`` at half the worker's ``max_jobs``, an endpoint whose limit is
the only thing contended never takes more than half the slots, and an
endpoint with a free slot never waits here: a slow endpoint does not delay
the others.
"""

from __future__ import annotations

import asyncio
import time

_EWMA = 0.2


class _Gate:
    __slots__ = ("booked", "hold_s", "sem", "size", "waiters")

    def __init__(self, size: int) -> None:
        self.size = size
        self.sem = asyncio.Semaphore(size)
        self.waiters = 0
        self.hold_s = 0.05
        """Recent time a local slot is held (EWMA): how fast the line moves."""
        self.booked = 0.0
        """Monotonic time up to which turned-away attempts have been told to come back."""


class Hold:
    """A held local slot; ``release()`` once the attempt is done."""

    __slots__ = ("_gate", "_started")

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        self._started = time.monotonic()

    def release(self) -> None:
        gate = self._gate
        gate.hold_s += _EWMA * (time.monotonic() - self._started - gate.hold_s)
        gate.sem.release()


class LocalGates:
    """``hold = await gates.enter(endpoint_id, size)``; ``hold.release()`` after."""

    def __init__(self, *, max_waiting: int, wait_s: float) -> None:
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.waiting = 0
        self._gates: dict[str, _Gate] = {}

    def _gate(self, endpoint_id: str, size: int) -> _Gate:
        gate = self._gates.get(endpoint_id)
        if gate is None or gate.size != size:
            # A changed limit gets a fresh semaphore; holders of the old one
            # release into it, which no longer matters.
            gate = self._gates[endpoint_id] = _Gate(size)
        return gate

    async def enter(self, endpoint_id: str, size: int) -> Hold | None:
        """A held local slot, or None if waiting for one is not allowed or took too long."""
        gate = self._gate(endpoint_id, max(1, size))
        if not gate.sem.locked():
            await gate.sem.acquire()  # returns at once
            return Hold(gate)
        if self.waiting >= self.max_waiting:
            return None
        self.waiting += 1
        gate.waiters += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await gate.sem.acquire()
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
            gate.waiters -= 1
        return Hold(gate)

    def defer_s(self, endpoint_id: str) -> float:
        """How long to defer an attempt turned away here: its turn in a virtual line.

        Each attempt turned away books the next turn after the local line and
        every turn booked before it, at the pace the endpoint has been
        serving. So a burst comes back spread at the rate the endpoint takes
        it, each attempt deferred about once, instead of every one polling
        back with backoff (several jobs each). 0 if nothing is known yet.
        """
        gate = self._gates.get(endpoint_id)
        if gate is None:
            return 0.0
        now = time.monotonic()
        step = gate.hold_s / gate.size
        gate.booked = max(gate.booked, now + (gate.waiters + gate.size) * step) + step
        return gate.booked - now
