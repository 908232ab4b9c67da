"""The read API of run trees: one trace's tree, and pages of recent traces."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bus.errors import InvalidQuery
from bus.keys import (
    TREE_SUMMARY,
    Keys,
    partition_of,
)
from bus.parsing import text
from bus.settings import Settings
from bus.traces.store import state_of
from bus.traces.tree import (
    Trace,
    TraceSummary,
    build_trace,
)

__all__ = ["TracePage", "get_trace", "list_traces"]

_summary_decoder = msgspec.json.Decoder(TraceSummary)

MAX_LIST_LIMIT = 1000
"""The largest page ``list_traces`` returns."""

LIST_SCAN_CAP = 5000
"""Index entries one ``list_traces`` call examines at most (filters are applied to
summaries, so a rare filter over a huge index returns a cursor to continue from)."""


class TracePage(msgspec.Struct, kw_only=True):
    """One page of :func:`list_traces`, newest update first."""

    traces: list[TraceSummary]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next page; None when the index is exhausted."""


# -- read API ----------------------------------------------------------------------


async def get_trace(redis: aioredis.Redis, settings: Settings, trace_id: str) -> Trace | None:
    """The run tree of ``trace_id`` (live or finished), or None when unknown or expired."""
    fields: Any = await redis.hgetall(_tree_key(settings, trace_id))
    state = state_of(trace_id, fields)
    return None if state is None else build_trace(state)


async def list_traces(
    redis: aioredis.Redis,
    settings: Settings,
    *,
    status: str | None = None,
    name: str | None = None,
    tag: str | None = None,
    metadata: Mapping[str, str] | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> TracePage:
    """Recent traces, most recently updated first, filtered and paged.

    ``metadata`` matches the root run's metadata, each value compared as text.
    A page can hold fewer than ``limit`` traces while ``next_cursor`` is set
    (at most :data:`LIST_SCAN_CAP` index entries are examined per call).
    Raises :class:`~bus.errors.InvalidQuery` for a ``limit`` outside 1..1000 or
    a cursor that no page returned.
    """
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
    top, after = _parse_cursor(cursor)
    merged = _MergedIndex(redis, settings, top, after, chunk=max(limit * 2, 100))
    found: list[TraceSummary] = []
    last = cursor
    for _ in range(LIST_SCAN_CAP):
        row = await merged.next()
        if row is None:
            return TracePage(traces=found, next_cursor=None)
        member, score, blob = row
        last = f"{score!r}:{member}"
        summary = _summary_decoder.decode(blob)
        if _matches(summary, status, name, tag, metadata):
            found.append(summary)
            if len(found) == limit:
                return TracePage(traces=found, next_cursor=last)
    return TracePage(traces=found, next_cursor=last)


_Row = tuple[str, float, bytes]


class _MergedIndex:
    """The partitions' indexes read as one, newest first (ties: member descending,
    as each ZSET orders them), skipping and pruning members whose tree is gone."""

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, top: float, after: str | None, chunk: int
    ) -> None:
        self._redis = redis
        self._settings = settings
        self._keys = Keys(settings.prefix, settings.partitions)
        self._top, self._after, self._chunk = top, after, chunk
        self._rows: list[list[_Row]] = [[] for _ in range(settings.partitions)]
        self._offsets = [0] * settings.partitions
        self._open = set(range(settings.partitions))

    async def next(self) -> _Row | None:
        await self._refill([p for p in self._open if not self._rows[p]])
        heads = [p for p, rows in enumerate(self._rows) if rows]
        if not heads:
            return None
        newest = max(heads, key=lambda p: self._rows[p][0][:2])
        return self._rows[newest].pop(0)

    async def _refill(self, partitions: list[int]) -> None:
        while partitions:
            async with self._redis.pipeline(transaction=False) as pipe:
                for p in partitions:
                    pipe.zrevrangebyscore(
                        self._keys.trace_index(p),
                        self._top,
                        "-inf",
                        start=self._offsets[p],
                        num=self._chunk,
                        withscores=True,
                    )
                replies = await pipe.execute()
            # A chunk whose every member is gone or skipped is followed by the next one.
            partitions = [
                p
                for p, raw in zip(partitions, replies, strict=True)
                if not await self._take(p, raw)
            ]

    async def _take(self, p: int, raw: Any) -> bool:
        """Keep a partition's chunk; False when it added nothing but more may follow."""
        self._offsets[p] += len(raw)
        if len(raw) < self._chunk:
            self._open.discard(p)
        rows = [(text(m), float(s)) for m, s in raw]
        if self._after is not None:  # equal scores come in descending member order
            rows = [(m, s) for m, s in rows if not (s == self._top and m >= self._after)]
        blobs = await _summaries(self._redis, self._settings, [m for m, _ in rows])
        gone = [m for (m, _), blob in zip(rows, blobs, strict=True) if blob is None]
        await _prune(self._redis, self._keys.trace_index(p), gone)
        kept = [(m, s, blob) for (m, s), blob in zip(rows, blobs, strict=True) if blob is not None]
        self._rows[p] = kept
        return bool(kept) or p not in self._open


def _parse_cursor(cursor: str | None) -> tuple[float, str | None]:
    if not cursor:
        return math.inf, None
    score, sep, member = cursor.partition(":")
    try:
        value = float(score)
    except ValueError:
        value = math.nan
    if not sep or math.isnan(value):
        raise InvalidQuery(f"bad trace list cursor: {cursor!r}")
    return value, member


def _tree_key(settings: Settings, trace_id: str) -> str:
    return Keys(settings.prefix, settings.partitions).tree(
        trace_id, partition_of(trace_id, settings.partitions)
    )


async def _summaries(
    redis: aioredis.Redis, settings: Settings, ids: Sequence[str]
) -> list[bytes | None]:
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for trace_id in ids:
            pipe.hget(_tree_key(settings, trace_id), TREE_SUMMARY)
        replies: list[bytes | None] = await pipe.execute()
    return replies


async def _prune(redis: aioredis.Redis, index: str, gone: list[str]) -> None:
    if gone:
        await redis.zrem(index, *gone)


def _matches(
    summary: TraceSummary,
    status: str | None,
    name: str | None,
    tag: str | None,
    metadata: Mapping[str, str] | None,
) -> bool:
    if status is not None and summary.status != status:
        return False
    if name is not None and summary.name != name:
        return False
    if tag is not None and tag not in summary.tags:
        return False
    return all(
        key in summary.metadata and _as_text(summary.metadata[key]) == wanted
        for key, wanted in (metadata or {}).items()
    )


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()
