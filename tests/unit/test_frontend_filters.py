"""Channel, namespace and depth filters (pure logic)."""

from __future__ import annotations

import json

import pytest

from bus.frontend.filters import Filter, FilterError, parse_channels
from bus.history import StreamItem


def _item(method: str, namespace: list[str], data: dict[str, object] | None = None) -> StreamItem:
    params = {"namespace": namespace, "data": data or {}}
    payload = json.dumps({"method": method, "params": params})
    return StreamItem("1-0", 1, method, False, payload.encode())


def test_no_filter_matches_everything() -> None:
    flt = Filter.build()
    assert flt.everything and flt.matches(_item("tools", ["a", "b"]))


def test_channels_match_the_method() -> None:
    flt = Filter.build(["messages", "custom:progress"])
    assert flt.matches(_item("messages", []))
    assert flt.matches(_item("custom:progress", []))
    assert not flt.matches(_item("tools", []))


def test_namespace_prefix_and_depth() -> None:
    flt = Filter.build(None, [["agent"]], 1)
    assert flt.matches(_item("messages", ["agent"]))
    assert flt.matches(_item("messages", ["agent", "tool"]))
    assert not flt.matches(_item("messages", ["agent", "tool", "deep"]))
    assert not flt.matches(_item("messages", ["other"]))
    unbounded = Filter.build(None, [["agent"]])
    assert unbounded.matches(_item("messages", ["agent", "tool", "deep"]))


def test_a_prefix_segment_without_an_id_matches_that_name_with_any_id() -> None:
    """As LangGraph's SDKs match them: ``["research"]`` covers ``["research:<task>"]``."""
    flt = Filter.build(["messages"], [["research"]], 0)
    assert flt.matches(_item("messages", ["research:t1"]))
    assert not flt.matches(_item("messages", ["researcher:t1"]))
    exact = Filter.build(["messages"], [["research:t1"]])
    assert exact.matches(_item("messages", ["research:t1", "inner:t2"]))
    assert not exact.matches(_item("messages", ["research:t9"]))


def test_a_named_custom_channel_matches_custom_events_of_that_name() -> None:
    flt = Filter.build(["custom:progress"])
    assert flt.matches(_item("custom", [], {"name": "progress", "payload": 1}))
    assert not flt.matches(_item("custom", [], {"name": "other", "payload": 1}))
    assert Filter.build(["custom"]).matches(_item("custom", [], {"name": "other"}))
    scoped = Filter.build(["custom:progress"], [["research"]])
    assert scoped.matches(_item("custom", ["research:t1"], {"name": "progress"}))
    assert not scoped.matches(_item("custom", [], {"name": "progress"}))


def test_depth_alone_counts_from_the_root() -> None:
    flt = Filter.build(None, None, 0)
    assert flt.matches(_item("messages", []))
    assert not flt.matches(_item("messages", ["sub"]))


@pytest.mark.parametrize(
    ("channels", "depth"), [(["nope"], None), (["custom:"], None), (["messages"], -1)]
)
def test_bad_filters_are_refused(channels: list[str], depth: int | None) -> None:
    with pytest.raises(FilterError):
        Filter.build(channels, None, depth)


def test_channels_query_parameter() -> None:
    assert parse_channels(None) is None
    assert parse_channels("messages, tools,,") == ["messages", "tools"]
