"""``lcbus trace TRACE_ID`` prints a run tree; ``lcbus traces`` lists recent traces."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis

from bus.connect import async_client
from bus.errors import InvalidQuery
from bus.parsing import key_values
from bus.settings import Settings
from bus.traces.queries import TracePage, get_trace, list_traces
from bus.traces.tree import RunNode, Trace, TraceSummary

T = TypeVar("T")


def register(subparsers: Any) -> None:
    one = subparsers.add_parser("trace", help="print one trace's run tree")
    one.add_argument("trace_id")
    one.add_argument("--json", action="store_true", help="the tree as JSON (the API schema)")
    one.set_defaults(run=run_trace)
    many = subparsers.add_parser("traces", help="list recent traces, newest first")
    many.add_argument("--status", choices=["running", "success", "error", "timeout"])
    many.add_argument("--name")
    many.add_argument("--tag")
    many.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    many.add_argument("--limit", type=int, default=20)
    many.add_argument("--cursor")
    many.add_argument("--json", action="store_true")
    many.set_defaults(run=run_traces)


def _with_client(settings: Settings, call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def go() -> T:
        client = async_client(settings)
        try:
            return await call(client)
        finally:
            await client.aclose()

    return asyncio.run(go())


def run_trace(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    trace = _with_client(settings, lambda r: get_trace(r, settings, args.trace_id))
    if trace is None:
        print(f"no trace {args.trace_id!r} (unknown or expired)", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(trace).decode())
    else:
        print(format_trace(trace))
    return 0


def run_traces(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        metadata = key_values(args.metadata, option="--metadata")
    except InvalidQuery as exc:
        print(exc, file=sys.stderr)
        return 2

    async def fetch(client: aioredis.Redis) -> TracePage:
        return await list_traces(
            client,
            settings,
            status=args.status,
            name=args.name,
            tag=args.tag,
            metadata=metadata,
            limit=args.limit,
            cursor=args.cursor,
        )

    try:
        page = _with_client(settings, fetch)
    except InvalidQuery as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(msgspec.json.encode(page).decode())
        return 0
    for summary in page.traces:
        print(format_summary(summary))
    if page.next_cursor:
        print(f"(more: --cursor '{page.next_cursor}')")
    return 0


def format_trace(trace: Trace) -> str:
    """The tree indented two spaces a level, one run a line."""
    lines = [format_summary(trace)]
    tops = ([trace.root] if trace.root else []) + trace.orphans
    for top in tops:
        _lines(top, 1, lines)
    if trace.orphans:
        lines.append(f"  ({len(trace.orphans)} run(s) whose parent has not reached the bus)")
    return "\n".join(lines)


def _lines(node: RunNode, depth: int, out: list[str]) -> None:
    kind = f"{node.run_type} {node.model_type}" if node.model_type else node.run_type
    parts = [f"{'  ' * depth}{node.name} [{kind}] {node.status}", _ms(node.duration_ms)]
    if node.usage is not None:
        usage = node.usage
        counts = (usage.input_tokens, usage.output_tokens, usage.total_tokens)
        given, taken, total = (_unknown_as_mark(count) for count in counts)
        parts.append(f"tokens {given}+{taken}={total}")
    elif node.model_type and node.end_time is not None:
        parts.append("tokens unknown")
    if node.token_count:
        parts.append(f"streamed {node.token_count}")
    if node.error:
        parts.append(f"error: {node.error}")
    out.append("  ".join(p for p in parts if p))
    for child in node.children:
        _lines(child, depth + 1, out)


def format_summary(summary: TraceSummary) -> str:
    total = summary.usage.total_tokens if summary.usage is not None else None
    return (
        f"{summary.trace_id}  {summary.name}  {summary.status}  {_ms(summary.latency_ms)}  "
        f"runs {summary.run_count}  model calls {summary.model_calls}  "
        f"tokens {_unknown_as_mark(total)}  errors {summary.errors}"
    ).replace("    ", "  ")


def _unknown_as_mark(count: int | None) -> str:
    """A token count, or ``?`` where the provider did not report it."""
    return "?" if count is None else str(count)


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.1f}ms"
