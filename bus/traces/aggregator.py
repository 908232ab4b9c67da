"""The trace worker's batch handler: fold run events into run trees, announce completions.

For each batch (one partition's entries, in stream order) the aggregator
groups the run events by trace, loads those traces' state (mostly from its
cache), merges the events (:func:`bus.traces.tree.apply`) and writes the states
back with a compare-and-set (:class:`bus.traces.store.TraceStore`). A trace that
lost the race is reloaded and the same events merged again; merging is
idempotent, so redelivered batches and replicas handing off are harmless.

When a trace completes (its root ended and no run is open), or no event came
for ``trace_complete_timeout_s`` (a periodic sweep), a ``trace_completed``
event goes onto the trace's event partition, exactly as the callback handler
would publish it, so that webhook subscribers see it. The script that saves
the tree also sets a flag and appends the event, atomically, so it is published
once per trace whatever replicas and redeliveries do, and never for a save that
lost the compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import msgspec
import redis.asyncio as aioredis

from bus import events as ev
from bus.errors import StateConflict
from bus.keys import Keys, partition_of
from bus.parsing import text
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from bus.traces.store import Loaded, TraceStore
from bus.traces.tree import TraceSummary, TreeState, apply, is_run_event, summarize

log = logging.getLogger(__name__)

SOURCE = "lcbus-traces"
"""The ``source`` of the events the trace worker publishes."""
MAX_SAVE_ATTEMPTS = 5
_ANNOUNCED_MEMORY = 10_000
_SWEEP_BATCH = 200


class TraceAggregator:
    """A :data:`bus.runtime.consumer.BatchHandler` that keeps run trees; also runs the sweep.

    Use as an async context manager (or :meth:`start` / :meth:`aclose`) to run
    the timeout sweep in the background; calling it with batches works either way.
    """

    def __init__(self, *, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.store = TraceStore(redis=redis, settings=settings)
        self._announced: OrderedDict[str, None] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        self.published = 0
        self.conflicts = 0

    async def __call__(self, batch: Sequence[Delivery]) -> None:
        by_trace: dict[str, list[ev.BaseEvent]] = {}
        for delivery in batch:
            event = delivery.event
            if is_run_event(event):
                by_trace.setdefault(event.trace_id, []).append(event)
        if by_trace:
            await self.apply(by_trace)

    async def apply(self, by_trace: Mapping[str, Sequence[ev.BaseEvent]]) -> None:
        """Merge each trace's events into its stored tree; announce those now complete."""
        pending = list(by_trace)
        new = {t for t, events in by_trace.items() if any(_starts_root(e) for e in events)}
        fresh = False
        for _ in range(MAX_SAVE_ATTEMPTS):
            loaded = await self.store.load(pending, fresh=fresh, new=new)
            now = time.time()
            for trace_id in pending:
                item = loaded[trace_id]
                for event in by_trace[trace_id]:
                    apply(item.state, event)
                    item.touched(event.run_id)
                item.state.updated_at = now
            conflicts = await self._save(loaded, now)
            if not conflicts:
                return
            self.conflicts += len(conflicts)
            pending, fresh = conflicts, True
        raise StateConflict(f"traces kept changing under this worker: {pending[:5]}")

    async def _save(self, loaded: Mapping[str, Loaded], now: float) -> list[str]:
        """Save, publishing ``trace_completed`` for the traces that just completed."""
        # One summary per trace and save: the save writes it, the announcement rolls it up.
        summaries = {trace_id: summarize(item.state) for trace_id, item in loaded.items()}
        announce = {
            trace_id: ev.encode(completed_event(item.state, summaries[trace_id]))
            for trace_id, item in loaded.items()
            if trace_id not in self._announced and summaries[trace_id].completed
        }
        saved = await self.store.save(loaded, now=now, announce=announce, summaries=summaries)
        self.published += len(saved.published)
        lost = set(saved.conflicts)
        for trace_id in announce:
            if trace_id not in lost:  # published now or before: no need to ask again
                self._announced[trace_id] = None
        while len(self._announced) > _ANNOUNCED_MEMORY:
            self._announced.popitem(last=False)
        return saved.conflicts

    # -- timeout sweep ---------------------------------------------------------------

    async def sweep(self, *, now: float | None = None) -> int:
        """Complete (status ``timeout``) the open traces idle for the completion timeout."""
        now = time.time() if now is None else now
        cutoff = now - self.settings.trace_complete_timeout_s
        partitions = range(self.settings.partitions)
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in partitions:
                pipe.zrangebyscore(
                    self.keys.trace_open(p), "-inf", cutoff, start=0, num=_SWEEP_BATCH
                )
            replies = await pipe.execute()
        ids = [text(m) for raw in replies for m in raw]
        if not ids:
            return 0
        loaded = await self.store.load(ids, fresh=True)
        # Re-check on the fresh state: an event may have come since the index was read.
        stale = {
            t: item
            for t, item in loaded.items()
            if item.version and not item.state.timed_out and item.state.updated_at <= cutoff
        }
        for item in stale.values():
            item.state.timed_out = True
        gone = [t for t, item in loaded.items() if not item.version]
        for trace_id in gone:
            await self.redis.zrem(
                self.keys.trace_open(partition_of(trace_id, self.settings.partitions)), trace_id
            )
        if not stale:
            return 0
        # updated_at stays the last event's: the sweep is not news about the trace.
        lost = await self._save(stale, now)
        return len(stale) - len(lost)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trace_sweep_interval_s)
            try:
                await self.sweep()
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("trace sweep failed: %r", exc)

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="lcbus-trace-sweep")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def __aenter__(self) -> TraceAggregator:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _starts_root(event: ev.BaseEvent) -> bool:
    return event.run_id == event.trace_id and isinstance(event, ev.RunStart)


def completed_event(state: TreeState, summary: TraceSummary | None = None) -> ev.TraceCompleted:
    """The ``trace_completed`` event of a trace: its status and rollups (``summary``,
    when the caller has it, is ``summarize(state)``).

    Its id is derived from the trace, so a receiver can deduplicate by it.
    """
    summary = summarize(state) if summary is None else summary
    rollup = {
        "usage": msgspec.to_builtins(summary.usage),
        "unreported_usage": summary.unreported_usage,
        "latency_ms": summary.latency_ms,
        "start_time": summary.start_time,
        "end_time": summary.end_time,
        "first_token_time": summary.first_token_time,
        "model_calls": summary.model_calls,
        "errors": summary.errors,
        "run_count": summary.run_count,
        "open_runs": summary.open_runs,
    }
    root = state.runs.get(state.trace_id)
    return ev.TraceCompleted(
        id=f"trace-completed-{state.trace_id}",
        time=time.time(),
        run_id=state.trace_id,
        trace_id=state.trace_id,
        seq=0,
        name=summary.name,
        run_type=root.run_type if root is not None else "",
        tags=summary.tags,
        metadata=summary.metadata,
        source=SOURCE,
        status=summary.status,
        rollup=rollup,
    )
