"""Protocol events as the fan-out worker builds, merges and stores them.

The wire shape is LangChain's agent streaming protocol (``langchain-protocol``):
``{"method": <channel>, "params": {"namespace": [...], "timestamp": <ms>,
"data": {...}}}``. The history layer (:mod:`bus.history`) splices ``type``,
``event_id`` and ``seq`` in front when it frames an event for a client.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from bus.history import Outgoing

MESSAGES = "messages"
TOOLS = "tools"
LIFECYCLE = "lifecycle"
CUSTOM = "custom"
TASKS = "tasks"

# Delta types whose payload is a string that clients append: consecutive ones of
# one block can be merged into one event without changing what clients build.
APPENDABLE_DELTAS = {
    "text-delta": "text",
    "reasoning-delta": "reasoning",
    "tool-call-delta": "args",
}

_encode = msgspec.json.Encoder().encode


@dataclass(slots=True)
class ProtoEvent:
    """One protocol event before it is stored."""

    method: str
    namespace: list[str]
    time: float
    """When the app produced it (seconds since the epoch)."""
    data: dict[str, Any]
    final: bool = False
    """The trace's last event (its root run completed or failed)."""
    merge_key: tuple[str, int] | None = None
    """(run id, block index) for an appendable content-block delta."""

    def payload(self) -> bytes:
        params = {"namespace": self.namespace, "timestamp": int(self.time * 1000)}
        params["data"] = self.data
        return _encode({"method": self.method, "params": params})

    def outgoing(self, *, final: bool | None = None) -> Outgoing:
        return Outgoing(self.method, self.payload(), self.final if final is None else final)


def coalesce(events: Iterable[ProtoEvent], window_s: float) -> list[ProtoEvent]:
    """Merge runs of consecutive appendable deltas of one block produced within ``window_s``.

    Only neighbours merge, so the order of everything else is untouched, and
    the merged event carries the concatenated payload: a client reassembles
    the same text from fewer events. Under load batches grow, so more merges
    happen exactly when they save the most.
    """
    merged = Coalescer(window_s)
    for event in events:
        merged.add(event)
    return merged.done()


class Coalescer:
    """A batch's events as :func:`coalesce` merges them, built one event at a time.

    The conversion feeds it directly, and a token that merges into the open
    delta is handed over as bare text (:meth:`extend`), so the per-token
    event is never built: most of a busy batch is such tokens.
    """

    __slots__ = ("_first", "_parts", "_window", "events")

    def __init__(self, window_s: float) -> None:
        self.events: list[ProtoEvent] = []
        self._window = window_s
        self._parts: list[str] = []
        """The texts merged into the last event (its own first), while it is a delta."""
        self._first = 0.0
        """When the last event's first delta was produced (the window runs from there)."""

    def add(self, event: ProtoEvent) -> None:
        key = event.merge_key
        if key is not None and self.extend(key, event.time, _delta_text(event)):
            return
        self._close()
        self._parts = [_delta_text(event)] if key is not None else []
        self._first = event.time
        self.events.append(event)

    def extend(self, key: tuple[str, int], at: float, text: str) -> bool:
        """Append ``text`` (a delta of block ``key`` produced at ``at``) to the last
        event when that is the same block's delta within the window; else False."""
        if (
            self._window > 0
            and self._parts
            and self.events[-1].merge_key == key
            and at - self._first <= self._window
        ):
            self._parts.append(text)
            self.events[-1].time = at
            return True
        return False

    def done(self) -> list[ProtoEvent]:
        self._close()
        return self.events

    def _close(self) -> None:
        if len(self._parts) > 1:
            _set_delta_text(self.events[-1], "".join(self._parts))
        self._parts = []


def _delta_text(event: ProtoEvent) -> str:
    delta = event.data["delta"]
    text: str = delta[APPENDABLE_DELTAS[delta["type"]]]
    return text


def _set_delta_text(event: ProtoEvent, text: str) -> None:
    delta = event.data["delta"]
    delta[APPENDABLE_DELTAS[delta["type"]]] = text
