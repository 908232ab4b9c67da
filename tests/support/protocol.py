"""Test helpers: validate protocol events against ``langchain-protocol``'s types,
read them back from history, and feed partition streams to a batch handler."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from langchain_protocol import protocol as lp
from pydantic import TypeAdapter

from bus.events import decode
from bus.history import Topic, read_after
from bus.keys import ENTRY_FIELD, Keys
from bus.runtime.consumer import Delivery
from bus.settings import Settings

_ENVELOPE = TypeAdapter(lp.Event)
_DATA: dict[str, dict[str, TypeAdapter[Any]]] = {
    "messages": {
        "message-start": TypeAdapter(lp.MessageStartData),
        "content-block-start": TypeAdapter(lp.ContentBlockStartData),
        "content-block-delta": TypeAdapter(lp.ContentBlockDeltaData),
        "content-block-finish": TypeAdapter(lp.ContentBlockFinishData),
        "message-finish": TypeAdapter(lp.MessageFinishData),
        "error": TypeAdapter(lp.MessageErrorData),
    },
    "tools": {
        "tool-started": TypeAdapter(lp.ToolStartedData),
        "tool-finished": TypeAdapter(lp.ToolFinishedData),
        "tool-error": TypeAdapter(lp.ToolErrorData),
    },
}
_LIFECYCLE = TypeAdapter(lp.LifecycleData)
_CUSTOM = TypeAdapter(lp.CustomData)
# The TypedDicts let unknown keys through; the envelope's keys are checked by name.
ENVELOPE_KEYS = {"type", "event_id", "seq", "method", "params"}
PARAMS_KEYS = {"namespace", "timestamp", "data"}


def check_keys(envelope: dict[str, Any]) -> None:
    """Raise unless the envelope has exactly the protocol's keys (``event_id``, not ``eventId``)."""
    assert set(envelope) == ENVELOPE_KEYS, sorted(envelope)
    assert set(envelope["params"]) == PARAMS_KEYS, sorted(envelope["params"])
    assert isinstance(envelope["event_id"], str) and isinstance(envelope["seq"], int)


def validate(envelope: dict[str, Any]) -> None:
    """Raise unless ``envelope`` is a protocol event whose data fits its channel's type."""
    _ENVELOPE.validate_python(envelope, strict=True)
    check_keys(envelope)
    params = envelope["params"]
    assert isinstance(params["namespace"], list)
    assert all(isinstance(part, str) for part in params["namespace"])
    assert isinstance(params["timestamp"], int)
    data, method = params["data"], envelope["method"]
    if method == "lifecycle":
        _LIFECYCLE.validate_python(data, strict=True)
    elif method == "custom":
        _CUSTOM.validate_python(data, strict=True)
    elif method == "tasks":
        assert isinstance(data["id"], str) and isinstance(data["name"], str)
    else:
        _DATA[method][data["event"]].validate_python(data, strict=True)


async def history(redis: aioredis.Redis, settings: Settings, topic: Topic) -> list[dict[str, Any]]:
    """Every event of ``topic``'s history, framed as clients get it, each validated."""
    items = await read_after(
        redis, Keys(settings.prefix, settings.partitions), topic, None, count=100_000
    )
    envelopes = []
    for item in items:
        envelope = json.loads(item.envelope())
        validate(envelope)
        assert envelope["event_id"] == item.event_id
        envelope["final"] = item.final
        envelopes.append(envelope)
    return envelopes


async def deliveries(redis: aioredis.Redis, settings: Settings) -> list[Delivery]:
    """Every entry of every partition stream, as the consumer would hand them over."""
    keys = Keys(settings.prefix, settings.partitions)
    result = []
    for partition in range(settings.partitions):
        entries: Any = await redis.xrange(keys.events(partition))
        for entry_id, fields in entries:
            event = decode(fields[ENTRY_FIELD])
            result.append(Delivery(entry_id.decode(), partition, event))
    return result


def text_of(events: list[dict[str, Any]], *, namespace: list[str] | None = None) -> str:
    """The text a client reassembles from the text deltas of ``events``."""
    parts = []
    for event in events:
        data = event["params"]["data"]
        if event["method"] != "messages" or data["event"] != "content-block-delta":
            continue
        if namespace is not None and event["params"]["namespace"] != namespace:
            continue
        if data["delta"]["type"] == "text-delta":
            parts.append(data["delta"]["text"])
    return "".join(parts)


def data_events(events: list[dict[str, Any]], method: str) -> list[str]:
    """The ``data.event`` names (or lifecycle states) of one channel, in order."""
    return [e["params"]["data"].get("event", "") for e in events if e["method"] == method]
