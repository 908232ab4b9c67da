"""Test helpers: put events on the partition streams the way the publisher does."""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from bus.events import BaseEvent, CustomEvent, Event, encode
from bus.keys import Keys, partition_of
from bus.settings import Settings


def make_event(trace_id: str, seq: int, **metadata: object) -> CustomEvent:
    return CustomEvent(
        id=f"{trace_id}-{seq}",
        time=time.time(),
        run_id=trace_id,
        trace_id=trace_id,
        seq=seq,
        event_name="probe",
        metadata=dict(metadata),
    )


def publish(client: redis.Redis, settings: Settings, events: Iterable[CustomEvent]) -> int:
    """Pipelined XADD of ``events`` onto their partitions; returns how many."""
    keys = Keys(settings.prefix)
    count = 0
    pipe = client.pipeline(transaction=False)
    for event in events:
        stream = keys.events(partition_of(event.trace_id, settings.partitions))
        pipe.xadd(stream, {b"e": encode(event)})
        count += 1
        if count % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return count


def traces_events(traces: int, per_trace: int, *, tag: str = "t") -> list[CustomEvent]:
    """``traces`` traces of ``per_trace`` events, interleaved as concurrent runs would be."""
    return [make_event(f"{tag}{t}", seq) for seq in range(per_trace) for t in range(traces)]


def publish_raw(client: redis.Redis, settings: Settings, partition: int, payload: bytes) -> str:
    entry_id = client.xadd(Keys(settings.prefix).events(partition), {b"e": payload})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def run_event(cls: type[BaseEvent], trace: str, run: str, seq: int, **fields: object) -> Event:
    """An event of type ``cls`` of run ``run`` in ``trace``, from source ``proc-a`` by default."""
    base = {
        "id": f"{trace}-{run}-{seq}",
        "time": 1000.0 + seq,
        "run_id": run,
        "trace_id": trace,
        "seq": seq,
        "source": "proc-a",
    }
    event: Event = cls(**(base | fields))  # type: ignore[assignment]
    return event
