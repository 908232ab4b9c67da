"""Bus events -> agent streaming protocol events, for one trace at a time.

Namespaces follow the protocol's convention of one ``name:id`` segment per
nested agent, and the trace's root run is ``[]``.

- Runs inside a LangGraph graph carry their task's checkpoint namespace in
  their metadata (``langgraph_checkpoint_ns``: ``node:task_id`` segments
  joined by ``|``). Their namespace is that path without its last segment,
  exactly the namespace LangGraph itself streams them under: the root graph's
  nodes (and the model and tool calls inside them) are at ``[]``, a subgraph's
  at ``["<node>:<task id>"]``. A subgraph is opened by the graph run whose task
  runs are one level deeper than the graph run itself; that run's end closes
  it, with a lifecycle event and a ``tasks`` result for the task that ran it.
- Other runs (plain LangChain): every nested *chain* run adds a segment
  ``"<run name>:<run id>"`` below its parent's namespace; leaf runs (models,
  tools, retrievers, prompts, parsers) open none, so their messages and tool
  calls appear in the namespace of the chain that called them.

Lifecycle events (``started`` / ``completed`` / ``failed``) are sent for the
root run (with its ``run_id``) and for every namespace opened; the root's
``completed`` or ``failed`` is the trace's final event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bus import events as ev
from bus.fanout.messages import MessageConverter, message_meta
from bus.fanout.protocol import CUSTOM, LIFECYCLE, TASKS, TOOLS, Coalescer, ProtoEvent
from bus.fanout.state import RunStream, StreamState

LEAF_RUN_TYPES = frozenset(
    {"llm", "chat_model", "tool", "retriever", "prompt", "parser", "embedding"}
)
GRAPH_NAMESPACE_KEY = "langgraph_checkpoint_ns"
"""Metadata key under which LangGraph names the task a run belongs to."""


def convert(state: StreamState, event: ev.Event) -> list[ProtoEvent]:
    """The protocol events for one bus event; updates ``state`` (the trace's)."""
    out: list[ProtoEvent] = []
    if not state.thread:
        thread = event.metadata.get("thread_id")
        if isinstance(thread, str | int) and str(thread):
            state.thread = str(thread)
    # Token and stream events first: most events are one of them, and a case naming
    # the exact class is the cheap one (isinstance against a base costs more).
    match event:
        case ev.LLMNewToken():
            MessageConverter(_run(state, event), event, out.append).token(event)
        case ev.StreamEvent():
            MessageConverter(_run(state, event), event, out.append).stream(event)
        case ev.ToolStart():
            run = _start(state, event, out)
            run.tool_call_id = event.tool_call_id or event.run_id
            data = {"event": "tool-started", "tool_call_id": run.tool_call_id}
            data["tool_name"] = event.name
            data["input"] = event.inputs if event.inputs is not None else event.input_str
            out.append(ProtoEvent(TOOLS, run.ns, event.time, data))
        case ev.RunStart():
            _start(state, event, out)
        case ev.LLMEnd():
            MessageConverter(_run(state, event), event, out.append).end(event)
            _end(state, event, out)
        case ev.LLMError():
            MessageConverter(_run(state, event), event, out.append).error(event)
            _end(state, event, out)
        case ev.ToolEnd() | ev.ToolError():
            _tool_end(state, event, out)
        case ev.RunEnd() | ev.RunError():
            _end(state, event, out)
        case ev.CustomEvent():
            data = {"name": event.event_name, "payload": event.data}
            out.append(ProtoEvent(CUSTOM, _run(state, event).ns, event.time, data))
        case _:
            pass  # agent actions, text, retries and bus-originated events: no channel
    return out


def convert_all(
    state: StreamState, events: Sequence[ev.Event], window_s: float = 0.0
) -> list[ProtoEvent]:
    """The protocol events of ``events``, their deltas merged as
    :func:`~bus.fanout.protocol.coalesce` merges them with ``window_s`` (0: none)."""
    merged = Coalescer(window_s)
    for event in events:
        if type(event) is ev.LLMNewToken and _merge_token(state, event, merged):
            continue
        for proto in convert(state, event):
            merged.add(proto)
    return merged.done()


def _merge_token(state: StreamState, event: ev.LLMNewToken, merged: Coalescer) -> bool:
    """A plain text token of a streaming run, merged into the open delta of its block.

    The same outcome as converting it and coalescing the delta, for the common
    case where nothing else happens: no event built, no message or block opened.
    """
    if not event.token or event.tool_call_chunks or (event.metadata and not state.thread):
        return False
    run = state.runs.get(event.run_id)
    if run is None or run.mode != "token":
        return False
    for index, block in enumerate(run.blocks):
        if block.key == "text":
            if not merged.extend((event.run_id, index), event.time, event.token):
                return False
            block.sent += len(event.token)
            return True
    return False


def _graph_namespace(event: ev.BaseEvent) -> list[str] | None:
    """The LangGraph namespace of a run inside a graph task; None outside LangGraph."""
    value = event.metadata.get(GRAPH_NAMESPACE_KEY)
    if not isinstance(value, str) or not value:
        return None
    return value.split("|")[:-1]


def _new_run(state: StreamState, event: ev.BaseEvent) -> RunStream:
    if event.run_id == event.trace_id:
        return RunStream(ns=[], chain=True, name=event.name)
    graph_ns = _graph_namespace(event)
    if graph_ns is not None:
        return RunStream(ns=graph_ns, name=event.name)
    parent = state.runs.get(event.parent_run_id or "")
    base = parent.ns if parent is not None else []
    if event.run_type in LEAF_RUN_TYPES:
        return RunStream(ns=base)
    return RunStream(ns=[*base, f"{event.name}:{event.run_id}"], chain=True)


def _run(state: StreamState, event: ev.BaseEvent) -> RunStream:
    """The run's state; rebuilt from its ancestry when its start is unknown here."""
    run = state.runs.get(event.run_id)
    if run is None:
        run = state.runs[event.run_id] = _new_run(state, event)
    return run


def _start(state: StreamState, event: ev.BaseEvent, out: list[ProtoEvent]) -> RunStream:
    run = state.runs[event.run_id] = _new_run(state, event)
    parent = state.runs.get(event.parent_run_id or "")
    if parent is not None:
        run.cause = parent.tool_call_id
    if isinstance(event, ev.LLMStart | ev.ChatModelStart):
        run.message_meta = message_meta(event)
    if run.chain:
        data: dict[str, Any] = {"event": "started", "graph_name": event.name}
        if event.run_id == event.trace_id:
            data["run_id"] = event.run_id
        if run.cause:
            data["cause"] = {"type": "toolCall", "tool_call_id": run.cause}
        out.append(ProtoEvent(LIFECYCLE, run.ns, event.time, data))
    elif parent is not None and not parent.owns and len(run.ns) > len(parent.ns):
        # The first task of a graph run one level down: that graph run is a subgraph.
        parent.owns = run.ns
        data = {"event": "started", "graph_name": parent.name}
        if parent.cause:
            data["cause"] = {"type": "toolCall", "tool_call_id": parent.cause}
        out.append(ProtoEvent(LIFECYCLE, run.ns, event.time, data))
    return run


def _end(state: StreamState, event: ev.RunEnd | ev.RunError, out: list[ProtoEvent]) -> None:
    run = state.runs.pop(event.run_id, None) or _new_run(state, event)
    if run.owns:
        _close_subgraph(run, event, out)
    if not run.chain:
        return
    data = _ending(event, event.name)
    if event.run_id == event.trace_id:
        data["run_id"] = event.run_id
    final = event.run_id == event.trace_id
    out.append(ProtoEvent(LIFECYCLE, run.ns, event.time, data, final=final))


def _ending(event: ev.RunEnd | ev.RunError, graph_name: str) -> dict[str, Any]:
    if isinstance(event, ev.RunError):
        return {"event": "failed", "graph_name": graph_name, "error": event.error or "failed"}
    return {"event": "completed", "graph_name": graph_name}


def _close_subgraph(run: RunStream, event: ev.RunEnd | ev.RunError, out: list[ProtoEvent]) -> None:
    """The subgraph's lifecycle end, and the ``tasks`` result of the task that ran it
    (the Python SDK ends a subgraph's handle on that result)."""
    out.append(ProtoEvent(LIFECYCLE, run.owns, event.time, _ending(event, run.name)))
    node, _, task_id = run.owns[-1].partition(":")
    error = (event.error or "failed") if isinstance(event, ev.RunError) else None
    task: dict[str, Any] = {"id": task_id, "name": node, "error": error, "interrupts": []}
    task["result"] = event.outputs if isinstance(event, ev.ChainEnd) else None
    out.append(ProtoEvent(TASKS, run.owns[:-1], event.time, task))


def _tool_end(state: StreamState, event: ev.ToolEnd | ev.ToolError, out: list[ProtoEvent]) -> None:
    run = _run(state, event)
    call_id = run.tool_call_id or event.run_id
    if isinstance(event, ev.ToolEnd):
        data = {"event": "tool-finished", "tool_call_id": call_id, "output": event.output}
    else:
        message = event.error or event.error_type
        data = {"event": "tool-error", "tool_call_id": call_id, "message": message}
        if event.error_type:
            data["code"] = event.error_type
    out.append(ProtoEvent(TOOLS, run.ns, event.time, data))
    _end(state, event, out)
