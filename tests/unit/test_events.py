"""The event model: round trips, schema evolution, malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from bus import events as ev
from bus.errors import EventDecodeError


def sample(**fields: object) -> ev.LLMNewToken:
    return ev.LLMNewToken(
        id=ev.new_event_id(), time=1.5, run_id="r", trace_id="t", seq=3, token="hi", **fields
    )


def test_msgpack_and_json_round_trip_every_type() -> None:
    for tag, cls in ev.EVENT_TYPES.items():
        event = cls(id="i", time=1.0, run_id="r", trace_id="t", seq=1, tags=["x"])
        assert ev.decode(ev.encode(event)) == event
        assert ev.decode_json(ev.encode_json(event)) == event
        assert ev.to_builtins(event)["type"] == tag == ev.event_type(event)


def test_one_event_type_per_langchain_callback() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    callbacks = {
        name
        for name in dir(BaseCallbackHandler)
        if name.startswith("on_") and callable(getattr(BaseCallbackHandler, name))
    }
    assert callbacks <= set(ev.EVENT_TYPES)


def test_unknown_type_decodes_to_fallback_and_is_counted() -> None:
    before = ev.decode_stats.unknown
    future = {
        "type": "on_future_thing",
        "id": "x",
        "time": 2.0,
        "run_id": "r",
        "trace_id": "t",
        "seq": 4,
        "brand_new_field": [1, 2],
    }
    event = ev.decode(msgspec.msgpack.encode(future))
    assert isinstance(event, ev.UnknownEvent)
    assert (event.original_type, event.trace_id, event.seq) == ("on_future_thing", "t", 4)
    assert isinstance(ev.decode_json(msgspec.json.encode(future)), ev.UnknownEvent)
    assert ev.decode_stats.unknown == before + 2


def test_new_fields_are_ignored_by_older_readers() -> None:
    event = sample()
    data = msgspec.to_builtins(event)
    data["added_in_a_later_version"] = {"x": 1}
    assert ev.decode(msgspec.msgpack.encode(data)) == event


@pytest.mark.parametrize(
    "payload",
    [b"garbage", b"", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"no": "type"})],
)
def test_garbage_raises_a_clear_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        ev.decode(payload)


def test_wrong_field_type_names_the_field() -> None:
    bad = msgspec.to_builtins(sample())
    bad["seq"] = "not a number"
    with pytest.raises(EventDecodeError, match=r"\$\.seq"):
        ev.decode(msgspec.msgpack.encode(bad))


def test_event_ids_are_unique_and_change_after_fork() -> None:
    ids = {ev.new_event_id() for _ in range(10_000)}
    assert len(ids) == 10_000


WIRE_0_1_0 = json.loads((Path(__file__).parent / "data" / "wire_0_1_0.json").read_text())


@pytest.mark.parametrize("tag", sorted(WIRE_0_1_0["events"]))
def test_an_event_encoded_by_0_1_0_decodes_the_same(tag: str) -> None:
    wire = WIRE_0_1_0["events"][tag]
    packed, text = bytes.fromhex(wire["msgpack"]), wire["json"]
    event = ev.decode(packed)
    assert type(event) is ev.EVENT_TYPES[tag]
    assert ev.to_builtins(event) == json.loads(text)
    assert ev.decode_json(text) == event
    # And the wire format did not move: the same event encodes to the same bytes.
    assert ev.encode(event) == packed
    assert ev.encode_json(event).decode() == text


def test_the_recorded_events_cover_every_type() -> None:
    assert set(WIRE_0_1_0["events"]) == set(ev.EVENT_TYPES)


def test_every_run_kind_has_a_start_an_end_and_an_error() -> None:
    def tags(base: type[ev.BaseEvent]) -> set[str]:
        return {tag for tag, cls in ev.EVENT_TYPES.items() if issubclass(cls, base)}

    assert tags(ev.RunStart) == {
        "on_llm_start",
        "on_chat_model_start",
        "on_chain_start",
        "on_tool_start",
        "on_retriever_start",
    }
    assert tags(ev.RunEnd) == {"on_llm_end", "on_chain_end", "on_tool_end", "on_retriever_end"}
    assert tags(ev.RunError) == {
        "on_llm_error",
        "on_chain_error",
        "on_tool_error",
        "on_retriever_error",
    }


def test_an_error_event_carries_its_error_on_the_base() -> None:
    event = ev.decode(bytes.fromhex(WIRE_0_1_0["events"]["on_tool_error"]["msgpack"]))
    match event:
        case ev.RunError(error=error, error_type=error_type):
            assert (error, error_type) == ("RuntimeError: no", "RuntimeError")
        case _:
            pytest.fail(f"not a RunError: {event!r}")
