"""Bus events -> protocol events, channel by channel (pure conversion, no Redis)."""

from __future__ import annotations

import json
import random
import time
from itertools import count
from typing import Any

import msgspec
import pytest

from bus import events as ev
from bus.fanout import state as fanstate
from bus.fanout.convert import convert, convert_all
from bus.fanout.protocol import ProtoEvent, coalesce
from bus.fanout.state import StreamState
from bus.history import StreamItem
from tests.support.protocol import validate

ROOT = "root-run"
_seq = count(1)


def make(cls: type[ev.BaseEvent], run_id: str = ROOT, parent: str | None = None, **fields: Any):
    fields.setdefault("name", "Step")
    fields.setdefault("seq", next(_seq))
    return cls(
        id=f"e{next(_seq)}",
        time=time.time(),
        run_id=run_id,
        trace_id=ROOT,
        parent_run_id=parent,
        **fields,
    )


def frames(events: list[ProtoEvent]) -> list[dict[str, Any]]:
    """Each event as the client sees it, validated against the protocol types."""
    result = []
    for seq, event in enumerate(events, 1):
        item = StreamItem("1-0", seq, event.method, event.final, event.payload())
        envelope = json.loads(item.envelope())
        validate(envelope)
        result.append(envelope)
    return result


def datas(events: list[ProtoEvent]) -> list[dict[str, Any]]:
    return [frame["params"]["data"] for frame in frames(events)]


def test_lifecycle_of_root_and_nested_chains_with_namespaces() -> None:
    state = StreamState()
    out = convert_all(
        state,
        [
            make(ev.ChainStart, name="Agent", run_type="chain"),
            make(ev.ChainStart, "sub", ROOT, name="Sub", run_type="chain"),
            make(ev.ChainStart, "prompt", "sub", name="Prompt", run_type="prompt"),
            make(ev.ChainEnd, "prompt", "sub", name="Prompt", run_type="prompt"),
            make(ev.ChainError, "sub", ROOT, name="Sub", run_type="chain", error="boom"),
            make(ev.ChainEnd, name="Agent", run_type="chain"),
        ],
    )
    got = [(f["params"]["namespace"], f["params"]["data"]) for f in frames(out)]
    assert got == [
        ([], {"event": "started", "graph_name": "Agent", "run_id": ROOT}),
        (["Sub:sub"], {"event": "started", "graph_name": "Sub"}),
        (["Sub:sub"], {"event": "failed", "graph_name": "Sub", "error": "boom"}),
        ([], {"event": "completed", "graph_name": "Agent", "run_id": ROOT}),
    ]
    assert [e.final for e in out] == [False, False, False, True]
    assert state.runs == {}


def test_root_failure_is_final() -> None:
    out = convert_all(StreamState(), [make(ev.ChainStart), make(ev.ChainError, error="x: y")])
    assert out[-1].final
    assert datas(out)[-1] == {
        "event": "failed",
        "graph_name": "Step",
        "error": "x: y",
        "run_id": ROOT,
    }


def _task(ns: str) -> dict[str, Any]:
    return {"metadata": {"langgraph_checkpoint_ns": ns}}


def test_langgraph_runs_take_the_namespaces_langgraph_streams_them_under() -> None:
    """Nodes of the root graph (and the model and tools inside them) are at [], a
    subgraph's runs under its task's segment; nested chains open no namespace."""
    sub_ns = "research:t1"
    state = StreamState()
    out = convert_all(
        state,
        [
            make(ev.ChainStart, name="agent", run_type="chain"),
            make(ev.ChainStart, "node", ROOT, name="research", **_task(sub_ns)),
            make(ev.ChainStart, "graph", "node", name="researcher", **_task(sub_ns)),
            make(
                ev.ChainStart, "inner", "graph", name="research", **_task(f"{sub_ns}|research:t2")
            ),
            make(
                ev.ChainStart,
                "seq",
                "inner",
                name="RunnableSequence",
                **_task(f"{sub_ns}|research:t2"),
            ),
            make(ev.CustomEvent, "seq", "inner", event_name="note", data={"n": 1}),
            make(
                ev.ChainEnd,
                "seq",
                "inner",
                name="RunnableSequence",
                **_task(f"{sub_ns}|research:t2"),
            ),
            make(ev.ChainEnd, "inner", "graph", name="research", **_task(f"{sub_ns}|research:t2")),
            make(
                ev.ChainEnd, "graph", "node", name="researcher", outputs={"ok": 1}, **_task(sub_ns)
            ),
            make(ev.ChainEnd, "node", ROOT, name="research", **_task(sub_ns)),
            make(ev.ChainStart, "model-node", ROOT, name="model", **_task("model:t3")),
            make(ev.CustomEvent, "model-node", ROOT, event_name="note", data={"n": 2}),
            make(ev.ChainEnd, "model-node", ROOT, name="model", **_task("model:t3")),
            make(ev.ChainEnd, name="agent", run_type="chain"),
        ],
    )
    got = [(f["method"], f["params"]["namespace"], f["params"]["data"]) for f in frames(out)]
    assert got == [
        ("lifecycle", [], {"event": "started", "graph_name": "agent", "run_id": ROOT}),
        ("lifecycle", [sub_ns], {"event": "started", "graph_name": "researcher"}),
        ("custom", [sub_ns], {"name": "note", "payload": {"n": 1}}),
        ("lifecycle", [sub_ns], {"event": "completed", "graph_name": "researcher"}),
        (
            "tasks",
            [],
            {"id": "t1", "name": "research", "error": None, "interrupts": [], "result": {"ok": 1}},
        ),
        ("custom", [], {"name": "note", "payload": {"n": 2}}),
        ("lifecycle", [], {"event": "completed", "graph_name": "agent", "run_id": ROOT}),
    ]
    assert state.runs == {}


def test_tools_channel_in_the_callers_namespace() -> None:
    state = StreamState()
    out = convert_all(
        state,
        [
            make(ev.ChainStart, name="Agent"),
            make(ev.ChainStart, "sub", ROOT, name="Sub", run_type="chain"),
            make(
                ev.ToolStart,
                "t1",
                "sub",
                name="add",
                run_type="tool",
                inputs={"a": 1},
                tool_call_id="call-1",
            ),
            make(ev.ToolEnd, "t1", "sub", name="add", run_type="tool", output="3"),
            make(ev.ToolStart, "t2", "sub", name="div", run_type="tool", input_str="1/0"),
            make(
                ev.ToolError,
                "t2",
                "sub",
                name="div",
                run_type="tool",
                error="ZeroDivisionError: x",
                error_type="ZeroDivisionError",
            ),
        ],
    )
    tools = [f for f in frames(out) if f["method"] == "tools"]
    assert [f["params"]["namespace"] for f in tools] == [["Sub:sub"]] * 4
    assert [f["params"]["data"] for f in tools] == [
        {"event": "tool-started", "tool_call_id": "call-1", "tool_name": "add", "input": {"a": 1}},
        {"event": "tool-finished", "tool_call_id": "call-1", "output": "3"},
        {"event": "tool-started", "tool_call_id": "t2", "tool_name": "div", "input": "1/0"},
        {
            "event": "tool-error",
            "tool_call_id": "t2",
            "message": "ZeroDivisionError: x",
            "code": "ZeroDivisionError",
        },
    ]


def test_chain_started_by_a_tool_names_the_tool_call_as_cause() -> None:
    state = StreamState()
    convert_all(
        state,
        [make(ev.ChainStart), make(ev.ToolStart, "t", ROOT, run_type="tool", tool_call_id="c9")],
    )
    out = convert(state, make(ev.ChainStart, "inner", "t", name="Inner", run_type="chain"))
    assert datas(out) == [
        {
            "event": "started",
            "graph_name": "Inner",
            "cause": {"type": "toolCall", "tool_call_id": "c9"},
        }
    ]


def test_custom_channel() -> None:
    state = StreamState()
    convert(state, make(ev.ChainStart))
    out = convert(state, make(ev.CustomEvent, event_name="progress", data={"pct": 50}))
    assert [f["method"] for f in frames(out)] == ["custom"]
    assert datas(out) == [{"name": "progress", "payload": {"pct": 50}}]


def _model_run(state: StreamState, run_type: str = "chat_model") -> None:
    convert(state, make(ev.ChainStart, name="Chain"))
    convert(
        state,
        make(
            ev.ChatModelStart,
            "m",
            ROOT,
            name="Model",
            run_type=run_type,
            metadata={"ls_provider": "openai", "ls_model_name": "gpt"},
        ),
    )


def test_messages_from_tokens_with_usage_from_llm_end() -> None:
    state = StreamState()
    _model_run(state)
    out = []
    for token in ["Hel", "lo", "!"]:  # tokens do not repeat the run's metadata
        out += convert(state, make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", token=token))
    out += convert(
        state,
        make(
            ev.LLMEnd,
            "m",
            ROOT,
            run_type="chat_model",
            text="Hello!",
            usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        ),
    )
    got = datas(out)
    assert got[0] == {
        "event": "message-start",
        "role": "ai",
        "id": "lc_run--m",
        "metadata": {"run_id": "m", "provider": "openai", "model": "gpt"},
    }
    assert got[1] == {
        "event": "content-block-start",
        "index": 0,
        "content": {"type": "text", "text": ""},
    }
    assert [d["delta"]["text"] for d in got[2:5]] == ["Hel", "lo", "!"]
    assert got[5] == {
        "event": "content-block-finish",
        "index": 0,
        "content": {"type": "text", "text": "Hello!"},
    }
    assert got[6] == {
        "event": "message-finish",
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    }
    assert all(f["params"]["namespace"] == [] for f in frames(out))


def test_messages_from_tool_call_chunks() -> None:
    state = StreamState()
    _model_run(state)
    chunks = [
        {"name": "add", "args": '{"a": ', "id": "c1", "index": 0, "type": "tool_call_chunk"},
        {"name": None, "args": "1}", "id": None, "index": 0, "type": "tool_call_chunk"},
        {"name": "bad", "args": "{", "id": "c2", "index": 1, "type": "tool_call_chunk"},
    ]
    out = []
    for chunk in chunks:
        out += convert(
            state, make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", tool_call_chunks=[chunk])
        )
    out += convert(state, make(ev.LLMEnd, "m", ROOT, run_type="chat_model"))
    got = datas(out)[1:]
    assert got == [
        {
            "event": "content-block-start",
            "index": 0,
            "content": {
                "type": "tool_call_chunk",
                "id": "c1",
                "name": "add",
                "args": "",
                "index": 0,
            },
        },
        {
            "event": "content-block-delta",
            "index": 0,
            "delta": {"type": "tool-call-delta", "args": '{"a": '},
        },
        {
            "event": "content-block-delta",
            "index": 0,
            "delta": {"type": "tool-call-delta", "args": "1}"},
        },
        {
            "event": "content-block-start",
            "index": 1,
            "content": {
                "type": "tool_call_chunk",
                "id": "c2",
                "name": "bad",
                "args": "",
                "index": 1,
            },
        },
        {
            "event": "content-block-delta",
            "index": 1,
            "delta": {"type": "tool-call-delta", "args": "{"},
        },
        {
            "event": "content-block-finish",
            "index": 0,
            "content": {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1}},
        },
        {
            "event": "content-block-finish",
            "index": 1,
            "content": {
                "type": "invalid_tool_call",
                "id": "c2",
                "name": "bad",
                "args": "{",
                "error": "Failed to parse tool call arguments as JSON",
            },
        },
        {"event": "message-finish"},
    ]


def test_stream_events_take_over_from_tokens_without_repeating_text() -> None:
    # Under stream_events(version="v3") the first token arrives before the first stream event.
    state = StreamState()
    _model_run(state)

    def token(text: str) -> ev.Event:
        return make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", token=text)

    def stream(data: dict[str, Any]) -> ev.Event:
        return make(ev.StreamEvent, "m", ROOT, run_type="chat_model", data=data)

    def delta(text: str) -> dict[str, Any]:
        return {
            "event": "content-block-delta",
            "index": 0,
            "delta": {"type": "text-delta", "text": text},
        }

    out = convert_all(
        state,
        [
            token("Hello"),
            stream({"event": "message-start", "role": "ai", "id": "lc_run--m"}),
            stream(
                {
                    "event": "content-block-start",
                    "index": 0,
                    "content": {"type": "text", "text": ""},
                }
            ),
            stream(delta("Hello")),
            token(" "),
            stream(delta(" ")),
            token("you"),
            stream(delta("you")),
            stream(
                {
                    "event": "content-block-finish",
                    "index": 0,
                    "content": {"type": "text", "text": "Hello you"},
                }
            ),
            stream({"event": "message-finish"}),
            make(ev.LLMEnd, "m", ROOT, run_type="chat_model", text="Hello you"),
        ],
    )
    got = datas(out)
    assert [d["event"] for d in got] == [
        "message-start",
        "content-block-start",
        "content-block-delta",
        "content-block-delta",
        "content-block-delta",
        "content-block-finish",
        "message-finish",
    ]
    assert (
        "".join(d["delta"]["text"] for d in got if d["event"] == "content-block-delta")
        == "Hello you"
    )


def test_stream_events_alone_pass_through() -> None:
    state = StreamState()
    _model_run(state)
    data = [
        {"event": "message-start", "role": "ai", "id": "x"},
        {
            "event": "content-block-start",
            "index": 0,
            "content": {"type": "reasoning", "reasoning": ""},
        },
        {
            "event": "content-block-delta",
            "index": 0,
            "delta": {"type": "reasoning-delta", "reasoning": "hm"},
        },
        {
            "event": "content-block-finish",
            "index": 0,
            "content": {"type": "reasoning", "reasoning": "hm"},
        },
        {"event": "message-finish", "usage": {"input_tokens": 1}},
    ]
    out = convert_all(
        state, [make(ev.StreamEvent, "m", ROOT, run_type="chat_model", data=d) for d in data]
    )
    out += convert(state, make(ev.LLMEnd, "m", ROOT, run_type="chat_model", text="hm"))
    assert datas(out) == data


def test_non_streaming_model_is_replayed_from_llm_end() -> None:
    state = StreamState()
    _model_run(state)
    generations = [[{"message": {"tool_calls": [{"name": "add", "args": {"a": 1}, "id": "c1"}]}}]]
    out = convert(
        state,
        make(
            ev.LLMEnd,
            "m",
            ROOT,
            run_type="chat_model",
            text="Sure",
            generations=generations,
            usage={"input_tokens": 4, "output_tokens": 1},
        ),
    )
    got = datas(out)
    assert [d["event"] for d in got] == [
        "message-start",
        "content-block-start",
        "content-block-delta",
        "content-block-finish",
        "content-block-start",
        "content-block-finish",
        "message-finish",
    ]
    assert got[2]["delta"] == {"type": "text-delta", "text": "Sure"}
    assert got[5]["content"] == {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1}}
    assert got[6]["usage"] == {"input_tokens": 4, "output_tokens": 1}


def test_model_error_mid_message() -> None:
    state = StreamState()
    _model_run(state)
    out = convert(state, make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", token="a"))
    out += convert(
        state,
        make(
            ev.LLMError,
            "m",
            ROOT,
            run_type="chat_model",
            error="RateLimit: slow",
            error_type="RateLimit",
        ),
    )
    assert datas(out)[-1] == {"event": "error", "message": "RateLimit: slow", "code": "RateLimit"}


def test_model_as_trace_root_gets_lifecycle() -> None:
    state = StreamState()
    out = convert_all(
        state,
        [
            make(ev.ChatModelStart, name="Model", run_type="chat_model"),
            make(ev.LLMNewToken, run_type="chat_model", token="hi"),
            make(ev.LLMEnd, run_type="chat_model", text="hi"),
        ],
    )
    assert out[0].method == "lifecycle"
    assert out[-1].method == "lifecycle" and out[-1].final


def test_state_survives_a_round_trip_mid_message() -> None:
    state = StreamState()
    _model_run(state)
    first = make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", token="ab", source="app")
    assert state.take("5-1", first)
    convert(state, first)
    assert state.take("5-2", make(ev.Text, source="app", seq=first.seq + 2))
    assert state.take("4-9", make(ev.Text))  # no source: recognised by its entry id
    reloaded = fanstate.load(fanstate.dump(state), b"7")
    assert reloaded.version == 7 and reloaded.runs == state.runs
    out = convert(reloaded, make(ev.LLMNewToken, "m", ROOT, run_type="chat_model", token="c"))
    assert datas(out) == [
        {"event": "content-block-delta", "index": 0, "delta": {"type": "text-delta", "text": "c"}}
    ]
    # The same event under another entry id (a re-sent batch) is recognised by its identity.
    assert not reloaded.take("9-1", first)
    assert reloaded.take("9-2", make(ev.Text, source="app", seq=first.seq + 1))
    assert reloaded.applied == {"app": [[first.seq, first.seq + 2]]}
    assert not reloaded.take("3-1", make(ev.Text)) and reloaded.take("5-0", make(ev.Text))


def test_applied_seqs_stay_bounded_whatever_the_producer_numbers() -> None:
    state = StreamState()
    for seq in range(1, 2 * fanstate.MAX_SEQ_RANGES + 10, 2):  # every other seq: all gaps
        assert state.take("1-1", make(ev.Text, source="odd", seq=seq))
    ranges = state.applied["odd"]
    assert len(ranges) == fanstate.MAX_SEQ_RANGES
    assert ranges[-1] == [2 * fanstate.MAX_SEQ_RANGES + 9, 2 * fanstate.MAX_SEQ_RANGES + 9]
    assert not state.take("1-1", make(ev.Text, source="odd", seq=7))  # merged away: old
    assert state.take("1-1", make(ev.Text, source="odd", seq=2 * fanstate.MAX_SEQ_RANGES + 8))


def _delta(text: str, at: float, index: int = 0, run: str = "m") -> ProtoEvent:
    data = {
        "event": "content-block-delta",
        "index": index,
        "delta": {"type": "text-delta", "text": text},
    }
    return ProtoEvent("messages", [], at, data, merge_key=(run, index))


def test_coalesce_merges_neighbouring_deltas_of_one_block_within_the_window() -> None:
    other = ProtoEvent("custom", [], 0.0, {"name": "x", "payload": 1})
    events = [
        _delta("a", 0.000),
        _delta("b", 0.001),
        _delta("c", 0.002),
        _delta("d", 0.002, index=1),
        other,
        _delta("e", 0.003),
        _delta("f", 0.020),
    ]
    merged = coalesce(events, window_s=0.005)
    assert [(e.method, e.data.get("delta", {}).get("text")) for e in merged] == [
        ("messages", "abc"),
        ("messages", "d"),
        ("custom", None),
        ("messages", "e"),
        ("messages", "f"),
    ]
    assert merged[0].time == 0.002
    assert [e.data["delta"]["text"] for e in coalesce([_delta("a", 0), _delta("b", 0)], 0)] == [
        "a",
        "b",
    ]


@pytest.mark.parametrize("window", [0.0, 0.005, 10.0])
def test_coalesce_never_changes_reassembled_text(window: float) -> None:
    events = [_delta(c, i * 0.001, index=i % 2) for i, c in enumerate("the quick brown fox")]
    merged = coalesce(events, window)
    for index in (0, 1):
        want = "".join(e.data["delta"]["text"] for e in events if e.data["index"] == index)
        got = "".join(e.data["delta"]["text"] for e in merged if e.data["index"] == index)
        assert got == want


def _reference_coalesce(events: list[ProtoEvent], window_s: float) -> list[ProtoEvent]:
    """Coalescing by its definition: a merged run's window starts at its first delta."""
    result: list[ProtoEvent] = []
    first = 0.0
    for event in events:
        prev = result[-1] if result else None
        if (
            window_s > 0
            and prev is not None
            and event.merge_key is not None
            and event.merge_key == prev.merge_key
            and event.time - first <= window_s
        ):
            delta, text = prev.data["delta"], event.data["delta"]
            field = "text" if "text" in delta else "args"
            prev.data = {**prev.data, "delta": {**delta, field: delta[field] + text[field]}}
            prev.time = event.time
            continue
        first = event.time
        result.append(event)
    return result


def _random_model_events(rng: random.Random) -> list[ev.Event]:
    """Two model runs of one trace, their tokens (text, empty, tool-call chunks, a
    thread id now and then) and stream events interleaved, at random gaps."""
    at = 1_700_000_000.0
    out: list[ev.Event] = [make(ev.ChainStart, name="Agent", run_type="chain")]
    runs = ["m1", "m2"]
    for run in runs:
        out.append(make(ev.ChatModelStart, run, ROOT, name="Model", run_type="chat_model"))
    for _ in range(rng.randrange(1, 40)):
        at += rng.choice([0.0, 0.0005, 0.002, 0.004, 0.006])
        run = rng.choice(runs)
        kind = rng.random()
        fields: dict[str, Any] = {"name": "Model", "run_type": "chat_model"}
        if rng.random() < 0.1:
            fields["metadata"] = {"thread_id": "t-1"}
        if kind < 0.75:
            token = rng.choice(["", "a", "bc", "d e"])
            event: ev.Event = make(ev.LLMNewToken, run, ROOT, token=token, **fields)
        elif kind < 0.85:
            chunk = {
                "index": 0,
                "id": "call-1",
                "name": "search",
                "args": rng.choice(['{"q"', ":1}"]),
            }
            event = make(ev.LLMNewToken, run, ROOT, tool_call_chunks=[chunk], **fields)
        else:
            delta = {"type": "text-delta", "text": rng.choice(["a", "bcd", "xyz"])}
            data = {"event": "content-block-delta", "index": 0, "delta": delta}
            event = make(ev.StreamEvent, run, ROOT, data=data, **fields)
        out.append(msgspec.structs.replace(event, time=at))
    return out


@pytest.mark.parametrize("window", [0.0, 0.001, 0.005])
def test_merging_while_converting_matches_converting_then_coalescing(window: float) -> None:
    """The token fast path (tokens merged as bare text, no event built) produces the
    very events and state that converting every event and coalescing afterwards does."""
    for seed in range(300):
        rng = random.Random(seed)
        events = _random_model_events(rng)
        cuts = sorted(rng.sample(range(1, len(events)), min(3, len(events) - 1)))
        fast, slow = StreamState(), StreamState()
        for batch in (events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)):
            got = convert_all(fast, batch, window)
            want = _reference_coalesce([p for e in batch for p in convert(slow, e)], window)
            assert [(p.payload(), p.time, p.final) for p in got] == [
                (p.payload(), p.time, p.final) for p in want
            ], f"seed {seed}"
            assert fanstate.dump(fast) == fanstate.dump(slow), f"seed {seed}"
