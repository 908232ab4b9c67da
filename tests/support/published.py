"""Test helpers: read back what reached the partition streams, and check a trace's shape."""

from __future__ import annotations

from collections import defaultdict

import redis

from bus import events as ev
from bus.events import decode
from bus.keys import ENTRY_FIELD, Keys
from bus.runtime.consumer import Delivery
from bus.settings import Settings


def bus_deliveries(client: redis.Redis, settings: Settings) -> list[Delivery]:
    """Every entry of every partition, decoded, in stream order per partition."""
    keys = Keys(settings.prefix)
    found = []
    for partition in range(settings.partitions):
        for entry_id, fields in client.xrange(keys.events(partition)):
            event = ev.decode(fields[ENTRY_FIELD])
            found.append(Delivery(entry_id.decode(), partition, event))
    return found


def read_all(client: redis.Redis, settings: Settings) -> list[ev.Event]:
    keys = Keys(settings.prefix)
    found: list[ev.Event] = []
    for partition in range(settings.partitions):
        for _, fields in client.xrange(keys.events(partition)):
            found.append(decode(fields[b"e"]))
    return found


def by_trace(events: list[ev.Event]) -> dict[str, list[ev.Event]]:
    traces: dict[str, list[ev.Event]] = defaultdict(list)
    for event in events:
        traces[event.trace_id].append(event)
    return traces


def check_trace(events: list[ev.Event], root: str) -> None:
    """One trace: seq 1..N in stream order, runs nested and each closed once."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.trace_id == root for e in events)
    started: dict[str, str | None] = {}
    ended: set[str] = set()
    for event in events:
        if isinstance(event, ev.RunStart):
            assert event.run_id not in started, "a run started twice"
            assert event.parent_run_id is None or event.parent_run_id in started
            assert event.parent_run_id not in ended, "child started after its parent ended"
            started[event.run_id] = event.parent_run_id
        elif isinstance(event, ev.RunEnd | ev.RunError):
            assert event.run_id in started and event.run_id not in ended
            assert event.parent_run_id == started[event.run_id]
            ended.add(event.run_id)
        else:
            assert event.run_id in started and event.run_id not in ended, ev.event_type(event)
    assert ended == set(started), "every run that started also ended"
    assert started[root] is None
