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
