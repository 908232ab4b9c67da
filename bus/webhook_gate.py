"""In-process waiting for an endpoint's own concurrency limit.

Redis holds the limits that count (:mod:`bus.webhook_limits`); this is the
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


class _Gate:
    __slots__ = ("sem", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.sem = asyncio.Semaphore(size)


class LocalGates:
    """``gate = await gates.enter(endpoint_id, size)``; ``gate.sem.release()`` after."""

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

    async def enter(self, endpoint_id: str, size: int) -> asyncio.Semaphore | None:
        """A held local slot, or None if waiting for one is not allowed or took too long."""
        sem = self._gate(endpoint_id, max(1, size)).sem
        if not sem.locked():
            await sem.acquire()  # returns at once
            return sem
        if self.waiting >= self.max_waiting:
            return None
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await sem.acquire()
        except TimeoutError:
            return None
        finally:
            self.waiting -= 1
        return sem

    def forget(self, endpoint_id: str) -> None:
        self._gates.pop(endpoint_id, None)
