"""The fan-out handler: bus events -> protocol events in per-trace history.

Called by the consumer runtime with one partition's entries in stream order.
Entries are grouped by trace (order inside a trace kept), converted with the
trace's state (:mod:`bus.fanout.convert`), consecutive text deltas merged as they
come (:class:`bus.fanout.protocol.Coalescer`), and every trace's events and new
state go to Redis in one round trip (packed by :mod:`bus.fanout.wire`): one
guarded script run per trace (:class:`bus.history.GuardedWriter`), which also
publishes each event live.
A trace with a ``thread_id`` is then copied to its thread's topic by a
second script in the thread's slot (on a cluster the thread's keys live
elsewhere). The copy is exactly once: the thread keeps, per trace, the last
trace entry it copied, and a copy whose expected marker is not the stored
one is refused; a replica that does not know the marker (it reloaded the
trace's state) catches the thread up from the trace's history instead, also
when the redelivered batch holds only entries already applied.

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
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from bus.errors import StateConflict
from bus.fanout import state as fanstate
from bus.fanout.convert import convert_all
from bus.fanout.state import StreamState
from bus.fanout.wire import execute, send
from bus.history import SCRIPTS, GuardedWriter, Outgoing, Topic
from bus.keys import HISTORY_CHANNEL, HISTORY_PAYLOAD, STATE_BLOB, STATE_VERSION, Keys
from bus.parsing import text
from bus.runtime.consumer import Delivery
from bus.runtime.resp_link import RespLink
from bus.settings import Settings

log = logging.getLogger(__name__)

MAX_CONFLICT_ROUNDS = 5
_CATCH_UP_PAGE = 500


@dataclass(slots=True)
class FanoutStats:
    entries: int = 0
    duplicates: int = 0
    """Entries skipped because their trace's history already holds their effect."""
    events: int = 0
    """Protocol events appended (per trace; a thread copy is not counted again)."""
    conflicts: int = 0
    """Guarded writes refused because another writer had changed the state."""


@dataclass(frozen=True, slots=True)
class _Copy:
    """A trace's entries of one batch, to append to its thread after the trace's write."""

    trace: str
    thread: str
    after: str
    """The last trace entry copied before these ('' for none)."""
    last: str
    items: list[tuple[str, bytes]]


class FanoutHandler:
    """A :data:`~bus.runtime.consumer.BatchHandler` writing protocol events to trace and thread
    history."""

    def __init__(
        self, *, redis: aioredis.Redis, settings: Settings, link: RespLink | None = None
    ) -> None:
        self._redis = redis
        self._link = link
        """Where the handler's round trips go when given (the worker gives it one of its
        own, see :mod:`bus.runtime.resp_link`); else through ``redis``'s pool."""
        self._keys = Keys(settings.prefix, settings.partitions)
        self._writer = GuardedWriter(
            redis, self._keys, maxlen=settings.history_maxlen, ttl_s=settings.history_ttl_s
        )
        self._window_s = settings.fanout_coalesce_ms / 1000
        self._cache_max = settings.fanout_cache_traces
        self._cache: dict[str, StreamState] = {}
        self._copied: dict[str, str] = {}
        """Per cached trace with a thread: its last history entry copied to the thread.
        Absent when unknown (state reloaded): the thread is then caught up from history."""
        self.stats = FanoutStats()

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        groups: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            groups.setdefault(delivery.event.trace_id, []).append(delivery)
        self.stats.entries += len(deliveries)
        copies: list[_Copy] = []
        threads: dict[str, str] = {}
        pending = groups
        for _ in range(MAX_CONFLICT_ROUNDS):
            await self._load([trace for trace in pending if trace not in self._cache])
            threads.update((t, self._cache[t].thread) for t in pending if self._cache[t].thread)
            try:
                refused = await self._apply(pending, copies)
            except NoScriptError:
                # Redis lost its script cache; _apply dropped the cached state.
                await self._writer.load()
                continue
            if refused:
                self.stats.conflicts += len(refused)
            pending = {trace: groups[trace] for trace in refused}
            if not pending:
                break
        # Threads are written after their traces (another slot on a cluster), also
        # for the traces written before a conflict gave up: their entries are acked.
        await self._copy_to_threads(copies, threads)
        if pending:
            raise StateConflict(
                f"state of traces {sorted(pending)} kept changing under this writer"
            )

    async def _load(self, traces: list[str]) -> None:
        if not traces:
            return

        def build(pipe: Any) -> None:
            for trace in traces:
                pipe.hmget(self._keys.fanout_state(trace), [STATE_VERSION, STATE_BLOB])

        replies = await send(self._redis, build, link=self._link)
        for trace, (version, blob) in zip(traces, replies, strict=True):
            self._cache[trace] = state = fanstate.load(blob, version)
            if state.version == 0:
                self._copied[trace] = ""  # never written: nothing copied to a thread either
            else:
                self._copied.pop(trace, None)

    async def _apply(self, groups: dict[str, list[Delivery]], copies: list[_Copy]) -> list[str]:
        """Convert and write every trace's entries in one round trip; return refused traces."""
        written: list[tuple[str, list[Outgoing]]] = []

        def build(pipe: Any) -> None:
            for trace, group in groups.items():
                events = self._queue(pipe, trace, group)
                if events is not None:
                    written.append((trace, events))

        try:
            replies = await send(self._redis, build, link=self._link)
        except BaseException:
            # The state in memory may be ahead of Redis now: reload it next time.
            for trace in groups:
                self._cache.pop(trace, None)
                self._copied.pop(trace, None)
            raise
        refused = []
        for (trace, events), (version, last) in zip(written, replies, strict=True):
            state = self._cache.pop(trace)
            if int(version) < 0:
                refused.append(trace)
                continue
            if state.thread and events and trace in self._copied:
                items = [(event.method, event.payload) for event in events]
                copies.append(_Copy(trace, state.thread, self._copied[trace], text(last), items))
            if state.runs:
                state.version = int(version)
                self._cache[trace] = state  # re-inserted: the cache evicts oldest first
        # Evicting costs one reload later; the version guard keeps it correct either way.
        while len(self._cache) > self._cache_max:
            evicted = next(iter(self._cache))
            del self._cache[evicted]
            self._copied.pop(evicted, None)
        return refused

    def _queue(
        self, pipe: aioredis.client.Pipeline, trace: str, group: list[Delivery]
    ) -> list[Outgoing] | None:
        state = self._cache[trace]
        fresh = [d for d in group if state.take(d.entry_id, d.event)]
        self.stats.duplicates += len(group) - len(fresh)
        if not fresh:
            return None
        events = convert_all(state, [d.event for d in fresh], self._window_s)
        self.stats.events += len(events)
        outgoing = [event.outgoing() for event in events]
        self._writer.queue(
            pipe,
            state_key=self._keys.fanout_state(trace),
            version=state.version,
            state=fanstate.dump(state),
            trace_id=trace,
            events=outgoing,
        )
        return outgoing

    async def _copy_to_threads(self, copies: list[_Copy], threads: dict[str, str]) -> None:
        """Append each trace's new entries to its thread, exactly once and in order."""
        try:
            replies = await self._run_copies(copies) if copies else []
        except BaseException:
            # The copies may or may not have been applied, and the retry will find
            # these entries already in the traces' history (nothing to copy then):
            # forget the markers, so that it catches the threads up from history.
            for copy in copies:
                self._copied.pop(copy.trace, None)
            raise
        for copy, reply in zip(copies, replies, strict=True):
            if reply == 1:
                self._remember_copied(copy.trace, copy.last)
            else:  # another writer copied meanwhile, or a copy was lost: catch up
                self._copied.pop(copy.trace, None)
        for trace, thread in threads.items():
            if trace not in self._copied:
                await self._catch_up(trace, thread)

    async def _run_copies(self, copies: list[_Copy]) -> list[Any]:
        def build(pipe: Any) -> None:
            for c in copies:
                self._writer.queue_copy(
                    pipe,
                    trace_id=c.trace,
                    thread_id=c.thread,
                    after=c.after,
                    last=c.last,
                    items=c.items,
                )

        return await execute(self._redis, SCRIPTS, build, link=self._link)

    async def _catch_up(self, trace: str, thread: str) -> None:
        """Copy to the thread every trace history entry after the thread's marker."""
        history = Topic("trace", trace).history(self._keys)
        marker = text(await self._redis.hget(self._keys.thread_copied(thread), trace) or b"")
        while True:
            entries: Any = await self._redis.xrange(
                history, min=f"({marker}" if marker else "-", max="+", count=_CATCH_UP_PAGE
            )
            if not entries:
                self._remember_copied(trace, marker)
                return
            last = text(entries[-1][0])
            items = [
                (fields[HISTORY_CHANNEL].decode(), fields[HISTORY_PAYLOAD]) for _, fields in entries
            ]
            (reply,) = await self._run_copies([_Copy(trace, thread, marker, last, items)])
            marker = last if reply == 1 else text(reply)

    def _remember_copied(self, trace: str, last: str) -> None:
        if trace in self._cache:
            self._copied[trace] = last
