"""State that workers keep in Redis, as an earlier version wrote it, still decodes."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from bus.fanout import state as fanstate
from bus.traces.tree import TreeState, build_trace

WIRE_0_1_0 = json.loads((Path(__file__).parent / "data" / "wire_0_1_0.json").read_text())


def test_a_run_tree_state_written_by_0_1_0_builds_the_same_tree() -> None:
    for name in ("tree_state", "tree_state_done"):
        stored = WIRE_0_1_0[name]
        blob = bytes.fromhex(stored["msgpack"])
        state = msgspec.msgpack.decode(blob, type=TreeState)
        assert msgspec.json.encode(build_trace(state)).decode() == stored["trace"]
        assert msgspec.msgpack.encode(state) == blob


def test_the_recorded_run_tree_holds_every_end_kind() -> None:
    blob = bytes.fromhex(WIRE_0_1_0["tree_state"]["msgpack"])
    state = msgspec.msgpack.decode(blob, type=TreeState)
    assert {run.id: run.end_kind for run in state.runs.values()} == {
        "root": "end",
        "model": "end",
        "tool": "error",
        "ret": "",
        "sub": "",
    }
    trace = build_trace(state)
    assert trace.root is not None
    assert [(run.id, run.status) for run in trace.root.children] == [
        ("model", "success"),
        ("tool", "error"),
        ("ret", "running"),
        ("sub", "running"),
    ]
    assert (trace.status, trace.errors, trace.open_runs) == ("running", 1, 2)


def test_a_fanout_state_written_by_0_1_0_loads_with_every_message_mode() -> None:
    stored = WIRE_0_1_0["fanout_state"]
    blob = bytes.fromhex(stored["msgpack"])
    state = fanstate.load(blob, stored["version"].encode())
    assert (state.version, state.last) == (4, "1700000000000-3")
    assert {run_id: run.mode for run_id, run in state.runs.items()} == {
        "root": "",
        "model": "token",
        "m2": "stream",
        "sub": "",
        "m4": "done",
    }
    assert fanstate.dump(state) == blob
