"""The fan-out handler: bus events -> protocol events in per-trace history.

Called by the consumer runtime with one partition's entries in stream order.
Entries are grouped by trace (order inside a trace kept), converted with the
trace's state (:mod:`bus.fanout.convert`), consecutive text deltas are merged
(:func:`bus.fanout.protocol.coalesce`), and every trace's events and new state go
to Redis in one pipelined round trip: one guarded script run per trace
(:class:`bus.history.GuardedWriter`), which also publishes each event live.

At-least-once delivery meets exactly-once history here: each trace's state
records the identity (``source``, ``seq``) of every event applied, written
atomically with the history under a version guard, so an event that arrives
again is skipped: a redelivered entry, or a second entry of a batch the
publisher re-sent after a timeout (it lands under a new entry id). State is cached in memory for
the traces this replica is working on, and reloaded when the guard reports
that another replica wrote in between (a lease moved and came back).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from bus.errors import StateConflict
from bus.fanout import state as fanstate
from bus.fanout.convert import convert_all
from bus.fanout.protocol import coalesce
from bus.fanout.state import StreamState
from bus.history import GuardedWriter, Topic
from bus.keys import STATE_BLOB, STATE_VERSION, Keys
from bus.runtime.consumer import Delivery
from bus.settings import Settings

log = logging.getLogger(__name__)

MAX_CONFLICT_ROUNDS = 5


@dataclass(slots=True)
class FanoutStats:
    entries: int = 0
    duplicates: int = 0
    """Entries skipped because their trace's history already holds their effect."""
    events: int = 0
    """Protocol events appended (per trace; a thread copy is not counted again)."""
    conflicts: int = 0
    """Guarded writes refused because another writer had changed the state."""


class FanoutHandler:
    """A :data:`~bus.runtime.consumer.BatchHandler` writing protocol events to trace and thread
    history."""

    def __init__(self, *, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._keys = Keys(settings.prefix)
        self._writer = GuardedWriter(
            redis, self._keys, maxlen=settings.history_maxlen, ttl_s=settings.history_ttl_s
        )
        self._window_s = settings.fanout_coalesce_ms / 1000
        self._cache_max = settings.fanout_cache_traces
        self._cache: dict[str, StreamState] = {}
        self.stats = FanoutStats()

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        groups: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            groups.setdefault(delivery.event.trace_id, []).append(delivery)
        self.stats.entries += len(deliveries)
        for _ in range(MAX_CONFLICT_ROUNDS):
            await self._load([trace for trace in groups if trace not in self._cache])
            try:
                refused = await self._apply(groups)
            except NoScriptError:
                # Redis lost its script cache; _apply dropped the cached state.
                await self._writer.load()
                continue
            if not refused:
                return
            self.stats.conflicts += len(refused)
            groups = {trace: groups[trace] for trace in refused}
        raise StateConflict(f"state of traces {sorted(groups)} kept changing under this writer")

    async def _load(self, traces: list[str]) -> None:
        if not traces:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for trace in traces:
                pipe.hmget(self._keys.fanout_state(trace), [STATE_VERSION, STATE_BLOB])
            replies = await pipe.execute()
        for trace, (version, blob) in zip(traces, replies, strict=True):
            self._cache[trace] = fanstate.load(blob, version)

    async def _apply(self, groups: dict[str, list[Delivery]]) -> list[str]:
        """Convert and write every trace's entries in one round trip; return refused traces."""
        written: list[str] = []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for trace, group in groups.items():
                    if self._queue(pipe, trace, group):
                        written.append(trace)
                replies = await pipe.execute() if written else []
        except BaseException:
            # The state in memory may be ahead of Redis now: reload it next time.
            for trace in groups:
                self._cache.pop(trace, None)
            raise
        refused = []
        for trace, reply in zip(written, replies, strict=True):
            state = self._cache.pop(trace)
            if int(reply) < 0:
                refused.append(trace)
            elif state.runs:
                state.version = int(reply)
                self._cache[trace] = state  # re-inserted: the cache evicts oldest first
        # Evicting costs one reload later; the version guard keeps it correct either way.
        while len(self._cache) > self._cache_max:
            del self._cache[next(iter(self._cache))]
        return refused

    def _queue(self, pipe: aioredis.client.Pipeline, trace: str, group: list[Delivery]) -> bool:
        state = self._cache[trace]
        fresh = [d for d in group if state.take(d.entry_id, d.event)]
        self.stats.duplicates += len(group) - len(fresh)
        if not fresh:
            return False
        events = coalesce(convert_all(state, [d.event for d in fresh]), self._window_s)
        topics = [Topic("trace", trace)]
        if state.thread:
            topics.append(Topic("thread", state.thread))
        self.stats.events += len(events)
        self._writer.queue(
            pipe,
            state_key=self._keys.fanout_state(trace),
            version=state.version,
            state=fanstate.dump(state),
            topics=topics,
            events=[event.outgoing() for event in events],
        )
        return True
