"""Riding out Redis outages: which errors are transient, backoff, log once.

Every long-running loop of the runtime (lease coordinator, partition readers,
metrics refresher) survives a Redis that goes away: it logs the outage once,
retries with capped exponential backoff and logs again when Redis is back.
"""

from __future__ import annotations

import logging
from typing import Protocol

from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("bus.runtime.outage")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError while a restarted server loads
    RedisTimeoutError,
    OSError,  # includes the builtin TimeoutError
    # A cluster node that cannot serve a slot right now: a restarted master
    # answers CLUSTERDOWN until it has rejoined, a migrating slot TRYAGAIN.
    ClusterDownError,
    TryAgainError,
    # A slot that no node served when the client last refreshed its slot map.
    SlotNotCoveredError,
)

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


class _ErrorCounter(Protocol):
    redis_errors: int


class Outage:
    """Backoff and log-once state of one loop."""

    __slots__ = ("_counter", "_failures", "_what")

    def __init__(self, what: str, counter: _ErrorCounter | None = None) -> None:
        self._what = what
        self._counter = counter
        self._failures = 0

    @property
    def active(self) -> bool:
        return self._failures > 0

    def failed(self, exc: BaseException) -> float:
        """Record a failure; return how long to wait before the next try."""
        if self._failures == 0:
            log.warning(
                "%s: Redis unavailable (%s: %s); retrying", self._what, type(exc).__name__, exc
            )
        if self._counter is not None:
            self._counter.redis_errors += 1
        delay: float = min(FIRST_BACKOFF_S * 2.0**self._failures, MAX_BACKOFF_S)
        self._failures += 1
        return delay

    def recovered(self) -> None:
        if self._failures:
            log.warning("%s: Redis is back after %d failed tries", self._what, self._failures)
            self._failures = 0
