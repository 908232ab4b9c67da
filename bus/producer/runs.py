"""Which trace each run belongs to, as seen by one handler in one process.

LangChain hands a callback the ``run_id`` and ``parent_run_id`` only; the
trace id (the root run) and the per-trace sequence number are ours to keep.
State lives from a run's start to its end, and a trace's from its first run's
start until none of its runs is open, so memory stays bounded by the runs in
flight (plus a hard cap against runs that never end).

Consumers recognise an event by ``(source, seq)``, so a trace that opens
again in this process (a later run joins it through ``lcbus_trace_id``, or an
event arrives after its runs ended) must not number its events from 1 again:
it continues where it stopped. The next seq of recently closed traces is
kept; a trace no longer remembered starts above every seq ever forgotten.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any
from uuid import UUID

from bus.keys import partition_of

MAX_OPEN_RUNS = 100_000
RECENT_TRACES = 10_000
"""Closed traces whose next seq is remembered, should they open again."""
TRACE_ID_METADATA_KEY = "lcbus_trace_id"
"""Metadata key that names the trace of a run whose parent lives in another process."""
THREAD_ID_METADATA_KEY = "thread_id"
"""Metadata key of the conversation a run belongs to (LangChain copies it from
``configurable``; LangGraph's ``thread_id``)."""


def partition_key(trace_id: str, metadata: dict[str, Any]) -> str:
    """What a trace's partition is chosen by: its thread when it has one, else itself.

    Every trace of a thread then shares one partition, so the fan-out worker (one
    lease holder per partition) appends a thread's runs in the order the app ran them.
    """
    thread = metadata.get(THREAD_ID_METADATA_KEY)
    if isinstance(thread, str | int) and not isinstance(thread, bool) and str(thread):
        return str(thread)
    return trace_id


class LiveTrace:
    """A trace with runs open in this process: its partition and next sequence number."""

    __slots__ = ("open_runs", "partition", "seq", "trace_id")

    def __init__(
        self, trace_id: str, partitions: int, first_seq: int = 1, *, key: str | None = None
    ) -> None:
        self.trace_id = trace_id
        self.partition = partition_of(key or trace_id, partitions)
        self.seq = itertools.count(first_seq)
        self.open_runs = 0


class Run:
    """What the end events of a run need but LangChain does not pass again."""

    __slots__ = ("key", "metadata", "name", "parent_run_id", "run_id", "run_type", "tags", "trace")

    def __init__(
        self,
        trace: LiveTrace,
        key: UUID,
        parent_run_id: str | None,
        name: str,
        run_type: str,
        tags: list[str],
        metadata: dict[str, Any],
    ) -> None:
        self.trace = trace
        self.key = key
        self.run_id = str(key)
        self.parent_run_id = parent_run_id
        self.name = name
        self.run_type = run_type
        self.tags = tags
        self.metadata = metadata


class RunRegistry:
    """Maps live run ids to their run and trace."""

    def __init__(self, partitions: int) -> None:
        self._partitions = partitions
        self._runs: dict[UUID, Run] = {}
        self._traces: dict[str, LiveTrace] = {}
        self._closed: OrderedDict[str, int] = OrderedDict()
        self._forgotten_seq = 0
        """The highest next seq of a closed trace no longer in ``_closed``."""

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, run_id: UUID) -> Run | None:
        return self._runs.get(run_id)

    def start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        *,
        name: str,
        run_type: str,
        tags: list[str],
        metadata: dict[str, Any],
    ) -> Run:
        """Register a run at its start event (or adopt one seen first mid-run)."""
        existing = self._runs.get(run_id)
        if existing is not None:
            return existing
        parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
        if parent is not None:
            trace = parent.trace
        else:
            trace_id = metadata.get(TRACE_ID_METADATA_KEY) or str(parent_run_id or run_id)
            trace = self._traces.get(str(trace_id)) or self._new_trace(str(trace_id), metadata)
        if len(self._runs) >= MAX_OPEN_RUNS:
            self._evict_oldest()
        trace.open_runs += 1
        run = Run(
            trace,
            run_id,
            str(parent_run_id) if parent_run_id is not None else None,
            name,
            run_type,
            tags,
            metadata,
        )
        self._runs[run_id] = run
        return run

    def lookup(self, run_id: UUID, parent_run_id: UUID | None) -> Run:
        """The run of an event that is not a start event."""
        run = self._runs.get(run_id)
        if run is not None:
            return run
        parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
        if parent is not None:
            # An event for a run we never saw start (e.g. a custom event of a child
            # runnable): it belongs to the parent's trace.
            return Run(parent.trace, run_id, parent.run_id, "", "", [], {})
        return self.start(run_id, parent_run_id, name="", run_type="", tags=[], metadata={})

    def end(self, run: Run) -> None:
        """Forget a run after its end or error event."""
        if self._runs.pop(run.key, None) is None:
            return
        trace = run.trace
        trace.open_runs -= 1
        if trace.open_runs <= 0 and self._traces.pop(trace.trace_id, None) is not None:
            self._closed[trace.trace_id] = next(trace.seq)
            if len(self._closed) > RECENT_TRACES:
                _, next_seq = self._closed.popitem(last=False)
                self._forgotten_seq = max(self._forgotten_seq, next_seq)

    def _new_trace(self, trace_id: str, metadata: dict[str, Any]) -> LiveTrace:
        first_seq = self._closed.pop(trace_id, None) or self._forgotten_seq + 1
        key = partition_key(trace_id, metadata)
        trace = self._traces[trace_id] = LiveTrace(trace_id, self._partitions, first_seq, key=key)
        return trace

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._runs.values()))
        self.end(oldest)
