"""Follow the event streams live, without a consumer group (read-only)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import redis

from bus import events as ev
from bus.errors import EventDecodeError
from bus.keys import ENTRY_FIELD, Keys
from bus.parsing import text
from bus.settings import Settings

Filter = Callable[[ev.Event], bool]


def event_filter(*, types: list[str] | None = None, trace_id: str | None = None) -> Filter:
    """Match events by type (``on_llm_end``, or a prefix such as ``on_tool``) and trace."""

    def matches(event: ev.Event) -> bool:
        if trace_id is not None and event.trace_id != trace_id:
            return False
        return not types or any(ev.event_type(event).startswith(t) for t in types)

    return matches


def follow(
    client: redis.Redis, settings: Settings, *, from_start: bool = False, block_ms: int = 1000
) -> Iterator[ev.Event | EventDecodeError]:
    """Yield events from every partition as they arrive (forever)."""
    keys = Keys(settings.prefix, settings.partitions)
    positions: dict[str, str] = {
        keys.events(p): "0-0" if from_start else "$" for p in range(settings.partitions)
    }
    while True:
        block = block_ms if block_ms > 0 else None
        replies: Any = client.xread(positions, count=500, block=block)  # type: ignore[arg-type]
        if not replies:
            # A server whose blocking read answers empty at once (plain fakeredis)
            # would otherwise make this a busy loop.
            time.sleep(0.02)
            continue
        for stream, entries in replies:
            name = text(stream)
            for entry_id, fields in entries:
                positions[name] = text(entry_id)
                try:
                    yield ev.decode(fields[ENTRY_FIELD])
                except (EventDecodeError, KeyError) as exc:
                    yield EventDecodeError(f"entry {positions[name]} on {name}: {exc!r}")


class RunNames:
    """Run names seen on start events: token events do not repeat their run's name."""

    def __init__(self, size: int = 10_000) -> None:
        self._names: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def of(self, event: ev.Event) -> str:
        if event.name:
            self._names[event.run_id] = event.name
            if len(self._names) > self._size:
                self._names.popitem(last=False)
            return event.name
        return self._names.get(event.run_id, "")


def describe(event: ev.Event, name: str | None = None) -> str:
    """One readable line per event (``name``: its run's, when the event lacks it)."""
    clock = datetime.fromtimestamp(event.time, UTC).strftime("%H:%M:%S.%f")[:-3]
    detail = _detail(event)
    shown = (name if name is not None else event.name)[:28]
    return (
        f"{clock} {event.trace_id[:8]} #{event.seq:<4} {ev.event_type(event):<22} "
        f"{shown:<28} {detail}"
    ).rstrip()


def _detail(event: ev.Event) -> str:
    match event:
        case ev.LLMNewToken(token=token):
            return repr(token)
        case ev.LLMEnd(usage=usage):
            return f"usage={usage}" if usage else ""
        case ev.LLMError(error=error) | ev.ChainError(error=error) | ev.ToolError(error=error):
            return f"error={error[:80]!r}"
        case ev.RetrieverError(error=error):
            return f"error={error[:80]!r}"
        case ev.CustomEvent(event_name=name, data=data):
            return f"{name} {str(data)[:60]}"
        case ev.ToolStart(input_str=text):
            return f"input={text[:60]!r}"
        case ev.TraceCompleted(status=status):
            return f"status={status}"
        case ev.UnknownEvent(original_type=original):
            return f"(unknown type {original})"
        case _:
            return ""
