"""The merge rules of the run tree: any delivery order, any number of processes, one tree."""

from __future__ import annotations

import msgspec

from bus import events as ev
from bus.traces.tree import TreeState, add_seq, apply, build_trace
from tests.support.publishing import run_event


def test_runs_from_two_processes_merge_and_tokens_count_once() -> None:
    tokens_a = [run_event(ev.LLMNewToken, "t", "m1", s, token="x") for s in (3, 4, 6)]
    # Another process numbers its own events from 1: same seqs, other source.
    tokens_b = [run_event(ev.LLMNewToken, "t", "m2", s, token="y", source="proc-b") for s in (3, 4)]
    events = [
        run_event(ev.ChainStart, "t", "t", 1, name="root", run_type="chain"),
        run_event(ev.ChatModelStart, "t", "m1", 2, parent_run_id="t", run_type="chat_model"),
        *tokens_a,
        run_event(
            ev.LLMEnd,
            "t",
            "m1",
            7,
            parent_run_id="t",
            usage={"input_tokens": 2, "output_tokens": 3},
        ),
        run_event(
            ev.ChatModelStart,
            "t",
            "m2",
            2,
            parent_run_id="t",
            run_type="chat_model",
            source="proc-b",
        ),
        *tokens_b,
        run_event(
            ev.LLMEnd,
            "t",
            "m2",
            5,
            parent_run_id="t",
            source="proc-b",
            llm_output={"token_usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        ),
        run_event(ev.ChainEnd, "t", "t", 9),
    ]
    forward, backward = TreeState(trace_id="t"), TreeState(trace_id="t")
    for event in events + events[3:6]:
        apply(forward, event)
    for event in reversed(events):
        apply(backward, event)
    one, two = build_trace(forward), build_trace(backward)
    assert msgspec.to_builtins(one) == msgspec.to_builtins(two)
    assert one.root is not None
    counts = {child.id: child.token_count for child in one.root.children}
    assert counts == {"m1": 3, "m2": 2}
    assert (one.usage.input_tokens, one.usage.output_tokens, one.usage.total_tokens) == (3, 4, 7)
    assert one.status == "success" and one.model_calls == 2
    assert one.first_token_time == 1003.0


def test_an_end_before_its_start_keeps_the_start_fields() -> None:
    state = TreeState(trace_id="t")
    apply(state, run_event(ev.ChainError, "t", "t", 2, error="KeyError: 'k'", name="late"))
    assert build_trace(state).status == "running"  # an ended run whose start is missing
    apply(state, run_event(ev.ChainStart, "t", "t", 1, name="root", tags=["x"]))
    trace = build_trace(state)
    assert trace.root is not None
    assert (trace.root.name, trace.root.tags, trace.status) == ("root", ["x"], "error")
    assert trace.root.error == "KeyError: 'k'"


def test_seq_ranges() -> None:
    ranges: list[list[int]] = []
    for seq in (5, 3, 4, 9, 7, 8, 4, 1):
        add_seq(ranges, seq)
    assert ranges == [[1, 1], [3, 5], [7, 9]]
    assert add_seq(ranges, 8) is False
    assert add_seq(ranges, 2) is True and ranges == [[1, 5], [7, 9]]


def test_a_run_whose_start_is_lost_takes_its_fields_from_its_end_not_its_tokens() -> None:
    state = TreeState(trace_id="t")
    common = {"time": 1.0, "trace_id": "t", "source": "app", "run_type": "chat_model"}
    apply(state, ev.LLMNewToken(id="a", run_id="m", seq=2, token="hi", **common))
    apply(state, ev.LLMEnd(id="b", run_id="m", seq=3, name="model", tags=["x"], **common))
    run = state.runs["m"]
    assert (run.name, run.tags, run.end_kind) == ("model", ["x"], "end")


def test_usage_not_reported_is_unknown_and_partial_usage_keeps_its_gaps() -> None:
    events = [
        run_event(ev.ChainStart, "t", "t", 1, name="root", run_type="chain"),
        run_event(ev.ChatModelStart, "t", "m1", 2, parent_run_id="t", run_type="chat_model"),
        run_event(ev.LLMEnd, "t", "m1", 3, parent_run_id="t", llm_output={"token_usage": {}}),
        run_event(ev.LLMStart, "t", "m2", 4, parent_run_id="t", run_type="llm"),
        run_event(ev.LLMEnd, "t", "m2", 5, parent_run_id="t", usage={"prompt_tokens": 4}),
        run_event(ev.ChainEnd, "t", "t", 6),
    ]
    state = TreeState(trace_id="t")
    for event in events[:3] + events[-1:]:
        apply(state, event)
    trace = build_trace(state)
    assert trace.root is not None
    [chat] = trace.root.children
    assert (chat.run_type, chat.model_type, chat.usage) == ("llm", "chat", None)
    assert (trace.usage, trace.unreported_usage, trace.model_calls) == (None, 1, 1)
    assert (trace.root.run_type, trace.root.model_type) == ("chain", None)
    for event in events[3:5]:
        apply(state, event)
    trace = build_trace(state)
    assert trace.root is not None
    completion = trace.root.children[1]
    assert (completion.run_type, completion.model_type) == ("llm", "llm")
    assert msgspec.to_builtins(completion.usage) == {
        "input_tokens": 4,
        "output_tokens": None,
        "total_tokens": None,
    }
    assert msgspec.to_builtins(trace.usage) == msgspec.to_builtins(completion.usage)
    assert trace.unreported_usage == 1


def test_the_demo_renders_unknown_counts_as_unknown() -> None:
    from bus.demo.client import render_tree

    node = {"name": "m", "run_type": "llm", "duration_ms": 1.0, "children": []}
    trace = {"trace_id": "t", "status": "success", "root": {**node, "usage": {"input_tokens": 2}}}
    assert render_tree(trace).splitlines()[1].split() == ["m", "(llm)", "1.0", "ms", "?", "tok"]
