"""Run trees: what is known about each run of a trace, merged from bus events.

Two layers, both msgspec Structs:

- the *state* (:class:`TreeState`, :class:`RunFacts`) is what the trace
  worker keeps in Redis: per run, the facts its start event, its end (or
  error) event and its token events carry. Applying an event merges facts and
  is idempotent and order-independent: a start or end is set once (an error
  beats a plain end, whatever arrives first), tokens are counted once per
  ``(source, seq)`` and the first-token time is a minimum, so duplicates,
  redeliveries, shuffles and runs coming from several processes all end in the
  same state.
- the *view* (:class:`Trace`, :class:`RunNode`, :class:`TraceSummary`) is the
  one documented schema served by ``GET /traces/{id}``, ``GET /traces`` and
  :func:`bus.traces.queries.get_trace`: the nested tree with LangSmith-style
  ``dotted_order``, per-run token usage and per-trace rollups.

Times are Unix seconds (floats) as the producing process saw them; durations
are milliseconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import msgspec

from bus import events as ev
from bus.seqranges import add_seq
from bus.traces.usage import TokenUsage, usage_of

LLM_RUN_TYPES = frozenset({"llm", "chat_model"})

RunStatus = Literal["running", "success", "error"]
TraceStatus = Literal["running", "success", "error", "timeout"]
"""A trace's status in the view: its root's, or ``timeout`` (see :class:`TraceSummary`)."""
EndKind = Literal["", "end", "error"]
"""How a run ended, in the state: ``""`` while it has not."""
ModelType = Literal["chat", "llm"]
"""What kind of model a model run was: LangChain's ``ls_model_type``."""
MODEL_TYPES: dict[str, ModelType] = {"chat_model": "chat", "llm": "llm"}
"""A model run's event ``run_type`` -> the tree's ``model_type``."""


# -- view: the public schema ------------------------------------------------------


# gc=False on the state Structs (and TokenUsage): they hold acyclic, JSON-like data,
# and the trace worker allocates many; untracked, they do not slow the cyclic collector.
class RunNode(msgspec.Struct, kw_only=True):
    """One run of the tree (a chain, model call, tool, retriever, prompt, parser…)."""

    id: str
    trace_id: str
    parent_run_id: str | None
    dotted_order: str
    """``<start %Y%m%dT%H%M%S%fZ><run id>`` of each ancestor and itself, joined by ``.``."""
    name: str
    run_type: str
    """As LangChain's tracer and LangSmith record it: a chat model's run is an ``llm`` run."""
    model_type: ModelType | None
    """``chat`` or ``llm`` (a completion model) for model runs; None for other runs."""
    status: RunStatus
    start_time: float | None
    end_time: float | None
    duration_ms: float | None
    inputs: Any
    outputs: Any
    error: str | None
    """``"ExcType: message"`` when the run failed."""
    error_type: str | None
    tags: list[str]
    metadata: dict[str, Any]
    usage: TokenUsage | None
    """Token usage the model reported (model runs only); None when it reported none
    (``ChatOpenAI`` streams without usage unless ``stream_usage=True``)."""
    first_token_time: float | None
    """When the first streamed token arrived (streaming model runs only)."""
    token_count: int
    """How many tokens were streamed."""
    children: list[RunNode]
    """Child runs ordered by start."""


class TraceSummary(msgspec.Struct, kw_only=True):
    """One trace without its runs: what ``GET /traces`` lists."""

    trace_id: str
    name: str
    status: TraceStatus
    """``running``; ``success`` or ``error`` (the root's) once the root ended and no run
    is open; ``timeout`` when no event came for the completion timeout before that."""
    completed: bool
    start_time: float | None
    end_time: float | None
    latency_ms: float | None
    usage: TokenUsage | None
    """Sum over every run that reported usage; None when no run did."""
    unreported_usage: int
    """Model runs that ended without reporting usage (not counted in ``usage``)."""
    model_calls: int
    errors: int
    """Runs that ended with an error (the root included)."""
    run_count: int
    open_runs: int
    first_token_time: float | None
    tags: list[str]
    """Union of every run's tags."""
    metadata: dict[str, Any]
    """The root run's metadata."""
    updated_at: float


class Trace(TraceSummary, kw_only=True):
    """A trace with its tree: ``root`` (the run whose id is the trace id) and any
    runs whose parent has not reached the bus (``orphans``, usually empty)."""

    root: RunNode | None
    orphans: list[RunNode]


# -- state: merged facts ------------------------------------------------------------


class RunFacts(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    id: str
    parent_run_id: str | None = None
    name: str = ""
    run_type: str = ""
    tags: list[str] = []
    metadata: dict[str, Any] = {}
    info_rank: tuple[int, str, int] = (9, "", 0)
    """Which event the fields above came from: the start beats any other, then the
    lowest (source, seq), so every arrival order picks the same one."""
    started: bool = False
    start_time: float | None = None
    start_seq: int = 0
    inputs: Any = None
    end_kind: EndKind = ""
    end_time: float | None = None
    outputs: Any = None
    error: str = ""
    error_type: str = ""
    usage: TokenUsage | None = None
    first_token_time: float | None = None
    tokens: dict[str, list[list[int]]] = {}
    """Per source, the seqs of the token events counted, as sorted [lo, hi] ranges."""


class TreeState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    trace_id: str
    runs: dict[str, RunFacts] = {}
    timed_out: bool = False
    updated_at: float = 0.0


# The classes the tree folds in, as a set: looking a type up is several times cheaper
# than isinstance() against the bases, and most events are tokens or stream events.
_RUN_EVENT_TYPES = frozenset(
    cls for cls in ev.EVENT_TYPES.values() if issubclass(cls, ev.RunStart | ev.RunEnd | ev.RunError)
) | {ev.LLMNewToken}


def _start_inputs(event: ev.RunStart) -> Any:
    """The run's inputs as LangChain's tracer records them."""
    match event:
        case ev.LLMStart():
            return {"prompts": event.prompts}
        case ev.ChatModelStart():
            return {"messages": event.messages}
        case ev.ChainStart():
            return event.inputs
        case ev.ToolStart():
            return event.inputs if event.inputs is not None else {"input": event.input_str}
        case ev.RetrieverStart():
            return {"query": event.query}
    return None


def _end_outputs(event: ev.RunEnd) -> Any:
    match event:
        case ev.LLMEnd():
            return {"generations": event.generations, "llm_output": event.llm_output}
        case ev.ChainEnd():
            return event.outputs
        case ev.ToolEnd():
            return {"output": event.output}
        case ev.RetrieverEnd():
            return {"documents": event.documents}
    return None


def is_run_event(event: ev.BaseEvent) -> bool:
    """Whether the trace worker folds this event into a run tree."""
    return type(event) in _RUN_EVENT_TYPES and bool(event.trace_id) and bool(event.run_id)


def apply(state: TreeState, event: ev.BaseEvent) -> None:
    """Merge one event's facts into ``state`` (other event types are ignored)."""
    if type(event) not in _RUN_EVENT_TYPES or not event.run_id:
        return
    run = state.runs.get(event.run_id)
    if run is None:
        run = state.runs[event.run_id] = RunFacts(id=event.run_id)
    # An end or error carries the run's fields too; a token does not (they ride on
    # the run's start and end only), so it never supplies them.
    if not run.started and not isinstance(event, ev.RunStart | ev.LLMNewToken):
        rank = (1, event.source, event.seq)
        if rank < run.info_rank:
            _take_fields(run, event, rank)
    match event:  # tokens first: the most frequent, and naming the exact class is cheapest
        case ev.LLMNewToken():
            _count_token(run, event)
        case ev.RunStart() if not run.started:
            _take_fields(run, event, (0, event.source, event.seq))
            run.started, run.start_time, run.start_seq = True, event.time, event.seq
            run.inputs = _start_inputs(event)
        case ev.RunError() if run.end_kind != "error":
            run.end_kind, run.end_time = "error", event.time
            run.error, run.error_type = event.error, event.error_type
        case ev.RunEnd() if not run.end_kind:
            run.end_kind, run.end_time = "end", event.time
            run.outputs = _end_outputs(event)
            if isinstance(event, ev.LLMEnd):
                run.usage = usage_of(event)


def _take_fields(run: RunFacts, event: ev.BaseEvent, rank: tuple[int, str, int]) -> None:
    run.info_rank = rank
    run.parent_run_id = event.parent_run_id
    run.name, run.run_type = event.name, event.run_type
    run.tags, run.metadata = event.tags, event.metadata  # never mutated in place


def _count_token(run: RunFacts, event: ev.LLMNewToken) -> None:
    ranges = run.tokens.get(event.source)
    if ranges is None:
        ranges = run.tokens[event.source] = []
    if not add_seq(ranges, event.seq):
        return
    first = run.first_token_time
    if first is None or event.time < first:
        run.first_token_time = event.time


def token_count(run: RunFacts) -> int:
    return sum(hi - lo + 1 for ranges in run.tokens.values() for lo, hi in ranges)


# -- from state to view ---------------------------------------------------------------


def is_complete(state: TreeState) -> bool:
    """The root ended and every run seen has both started and ended."""
    root = state.runs.get(state.trace_id)
    if root is None or not root.end_kind:
        return False
    return all(run.started and run.end_kind for run in state.runs.values())


def summarize(state: TreeState) -> TraceSummary:
    """The trace's rollups (everything but the runs)."""
    runs = state.runs.values()
    root = state.runs.get(state.trace_id)
    top = root or min(runs, key=_start_key, default=None)
    complete = is_complete(state)
    status: TraceStatus
    if complete and root is not None:
        status = "error" if root.end_kind == "error" else "success"
    else:
        status = "timeout" if state.timed_out else "running"
    usage: TokenUsage | None = None
    for run in runs:
        if run.usage is not None:
            usage = usage or TokenUsage()
            usage.add(run.usage)
    start = top.start_time if top is not None else None
    end = root.end_time if complete and root is not None else None
    first_tokens = [r.first_token_time for r in runs if r.first_token_time is not None]
    return TraceSummary(
        trace_id=state.trace_id,
        name=top.name if top is not None else "",
        status=status,
        completed=complete or state.timed_out,
        start_time=start,
        end_time=end,
        latency_ms=_ms(start, end),
        usage=usage,
        unreported_usage=sum(
            1 for r in runs if r.run_type in LLM_RUN_TYPES and r.end_kind and r.usage is None
        ),
        model_calls=sum(1 for r in runs if r.run_type in LLM_RUN_TYPES),
        errors=sum(1 for r in runs if r.end_kind == "error"),
        run_count=len(state.runs),
        open_runs=sum(1 for r in runs if not r.end_kind),
        first_token_time=min(first_tokens, default=None),
        tags=sorted({tag for r in runs for tag in r.tags}),
        metadata=dict(top.metadata) if top is not None else {},
        updated_at=state.updated_at,
    )


def build_trace(state: TreeState) -> Trace:
    """The tree of ``state``: children under their parents, ordered by start."""
    children: dict[str | None, list[RunFacts]] = {}
    for run in state.runs.values():
        parent = run.parent_run_id if run.parent_run_id in state.runs else None
        children.setdefault(parent, []).append(run)
    for runs in children.values():
        runs.sort(key=_start_key)

    def node(run: RunFacts, prefix: str) -> RunNode:
        dotted = prefix + _stamp(run.start_time) + run.id
        kids = [node(child, dotted + ".") for child in children.get(run.id, ())]
        return _node(state.trace_id, run, dotted, kids)

    tops = [node(run, "") for run in children.get(None, ())]
    root = next((top for top in tops if top.id == state.trace_id), None)
    fields = msgspec.structs.asdict(summarize(state))
    return Trace(**fields, root=root, orphans=[top for top in tops if top is not root])


_RUN_STATUS: dict[EndKind, RunStatus] = {"": "running", "end": "success", "error": "error"}


def _node(trace_id: str, run: RunFacts, dotted: str, children: list[RunNode]) -> RunNode:
    return RunNode(
        id=run.id,
        trace_id=trace_id,
        parent_run_id=run.parent_run_id,
        dotted_order=dotted,
        name=run.name,
        run_type="llm" if run.run_type in LLM_RUN_TYPES else run.run_type,
        model_type=MODEL_TYPES.get(run.run_type),
        status=_RUN_STATUS[run.end_kind],
        start_time=run.start_time,
        end_time=run.end_time,
        duration_ms=_ms(run.start_time, run.end_time),
        inputs=run.inputs,
        outputs=run.outputs,
        error=run.error or None,
        error_type=run.error_type or None,
        tags=run.tags,
        metadata=run.metadata,
        usage=run.usage,
        first_token_time=run.first_token_time,
        token_count=token_count(run),
        children=children,
    )


def _start_key(run: RunFacts) -> tuple[float, int, str]:
    # The producer's seq breaks ties of equal clock readings (it is the callback order).
    known = run.start_time if run.start_time is not None else run.first_token_time
    when = known if known is not None else (run.end_time or 0.0)
    return (when, run.start_seq, run.id)


def _stamp(when: float | None) -> str:
    """The LangSmith dotted-order time stamp of a run's start."""
    moment = dt.datetime.fromtimestamp(when or 0.0, tz=dt.UTC)
    return moment.strftime("%Y%m%dT%H%M%S%fZ")


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)
