"""A run tree as the protocol's agent tree (``agent.getTree``): the root graph and its
subgraphs, each with its namespace, status and graph name.

Namespaces are the ones the fan-out worker streams events under: inside a
LangGraph graph, a run's namespace is its task's checkpoint namespace without
the last segment, and a graph run whose child tasks are one level deeper
opens a subgraph; outside LangGraph, every nested chain run opens
``"<name>:<run id>"``.
"""

from __future__ import annotations

from typing import Any

from bus.traces.tree import RunNode, Trace

GRAPH_NAMESPACE_KEY = "langgraph_checkpoint_ns"
LEAF_RUN_TYPES = frozenset(
    {"llm", "chat_model", "tool", "retriever", "prompt", "parser", "embedding"}
)
_STATUS = {"running": "running", "success": "completed", "error": "failed"}


def _graph_namespace(run: RunNode) -> list[str] | None:
    value = run.metadata.get(GRAPH_NAMESPACE_KEY)
    if not isinstance(value, str) or not value:
        return None
    return value.split("|")[:-1]


def _agent(namespace: list[str], run: RunNode, status: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"namespace": namespace, "graph_name": run.name}
    node["status"] = status or _STATUS.get(run.status, "running")
    node["metadata"] = {"run_id": run.id}
    node["children"] = []
    return node


def agent_tree(trace: Trace) -> dict[str, Any] | None:
    """The ``AgentTreeNode`` of a trace's root run, or None before the root is known."""
    root = trace.root
    if root is None:
        return None
    status = "failed" if trace.status == "timeout" else None
    top = _agent([], root, status)
    _walk(root, [], top)
    return top


def _walk(run: RunNode, namespace: list[str], agent: dict[str, Any]) -> None:
    """Add the subgraphs below ``run`` (whose events are in ``namespace``) to ``agent``."""
    opened: dict[str, Any] | None = None
    for child in run.children:
        graph_ns = _graph_namespace(child)
        if graph_ns is not None:
            child_ns = graph_ns
        elif child.run_type in LEAF_RUN_TYPES:
            child_ns = namespace
        else:
            child_ns = [*namespace, f"{child.name}:{child.id}"]
        target = agent
        if len(child_ns) > len(namespace):
            # A nested namespace: a subgraph this run opened (LangGraph) or a nested chain.
            if graph_ns is None:
                target = _agent(child_ns, child)
                agent["children"].append(target)
            else:
                if opened is None:
                    opened = _agent(child_ns, run)
                    agent["children"].append(opened)
                target = opened
        _walk(child, child_ns, target)
