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
    result: list[ProtoEvent] = []
    parts: list[str] = []
    first_time = 0.0
    for event in events:
        prev = result[-1] if result else None
        if (
            window_s > 0
            and prev is not None
            and event.merge_key is not None
            and event.merge_key == prev.merge_key
            and event.time - first_time <= window_s
        ):
            parts.append(_delta_text(event))
            prev.time = event.time
            continue
        if parts and prev is not None:
            _set_delta_text(prev, "".join(parts))
        parts = [_delta_text(event)] if event.merge_key is not None else []
        first_time = event.time
        result.append(event)
    if parts and result:
        _set_delta_text(result[-1], "".join(parts))
    return result


def _delta_text(event: ProtoEvent) -> str:
    delta = event.data["delta"]
    text: str = delta[APPENDABLE_DELTAS[delta["type"]]]
    return text


def _set_delta_text(event: ProtoEvent, text: str) -> None:
    delta = event.data["delta"]
    delta[APPENDABLE_DELTAS[delta["type"]]] = text
