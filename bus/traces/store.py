"""Run trees in Redis: the trace worker's writes and the read API.

Each trace is one hash ``keys.tree(trace_id, partition)`` with fields
``STATE_VERSION`` (a version counter), ``TREE_TRACE`` (the msgpack
:class:`~bus.traces.tree.TreeState` without its runs), ``TREE_RUN_PREFIX`` +
run id (each run's msgpack :class:`~bus.traces.tree.RunFacts`) and
``TREE_SUMMARY`` (the JSON :class:`~bus.traces.tree.TraceSummary` the list
filters read), expiring ``trace_ttl_s`` after its last write. A save writes
only the runs the batch changed, the summary and the trace's own fields: a
trace of a thousand large tool runs costs each run's bytes about once, not the
whole tree per batch. (A tree an older version stored as one state blob,
``STATE_BLOB``, still loads; its next save writes every run and drops the
blob.) A write is a compare-and-set on ``v``:
leases make one worker replica the writer of a trace's partition, but a
replica that lost its lease mid-batch, or the timeout sweep of another replica,
may write too; the loser reloads and re-applies (applying is idempotent).
The same script, when asked, publishes the trace's ``trace_completed`` event
on its event partition, guarded by a flag so that it happens once per trace:
the tree key is tagged with the partition so that all three keys share a slot.

``keys.trace_index()`` is a ZSET of trace ids scored by their last write; the
trees expire by TTL, and the index drops members older than the TTL on every
write and members whose tree is gone whenever a read meets them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bus.errors import InvalidQuery
from bus.keys import (
    STATE_BLOB,
    STATE_VERSION,
    TREE_RUN_PREFIX,
    TREE_SUMMARY,
    TREE_TRACE,
    Keys,
    lua_fields,
    partition_of,
)
from bus.parsing import text
from bus.scripts import LuaScript, execute
from bus.settings import Settings
from bus.traces.tree import (
    RunFacts,
    Trace,
    TraceSummary,
    TreeState,
    build_trace,
    is_complete,
    summarize,
)

__all__ = ["Loaded", "Saved", "TracePage", "TraceStore", "get_trace", "list_traces"]

MAX_LIST_LIMIT = 1000
"""The largest page ``list_traces`` returns."""

LIST_SCAN_CAP = 5000
"""Index entries one ``list_traces`` call examines at most (filters are applied to
summaries, so a rare filter over a huge index returns a cursor to continue from)."""

_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(TreeState)
_summary_decoder = msgspec.json.Decoder(TraceSummary)

_run_encoder = msgspec.msgpack.Encoder()
_run_decoder = msgspec.msgpack.Decoder(RunFacts)

# KEYS: tree, done flag, event stream. ARGV: expected version, trace fields, summary, ttl,
# completed event ('' for none), stream maxlen, '1' to drop a legacy state blob, then
# (run field, run) pairs.
# -> {new version, 1 if the event was published}, or -1 when the version moved on.
_SAVE = LuaScript(
    lua_fields("""
local v = redis.call('HGET', KEYS[1], '$VERSION') or '0'
if v ~= ARGV[1] then return -1 end
local new = tonumber(v) + 1
redis.call('HSET', KEYS[1], '$VERSION', new, '$TREE_TRACE', ARGV[2], '$SUMMARY', ARGV[3])
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[7] == '1' then redis.call('HDEL', KEYS[1], '$BLOB') end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' and redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[4]) then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', '$ENTRY', ARGV[5])
  return {new, 1}
end
return {new, 0}
""")
)


class TracePage(msgspec.Struct, kw_only=True):
    """One page of :func:`list_traces`, newest update first."""

    traces: list[TraceSummary]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next page; None when the index is exhausted."""


@dataclass(slots=True)
class Saved:
    conflicts: list[str]
    """Traces whose stored version moved on: reload and merge again."""
    published: list[str]
    """Traces whose ``trace_completed`` event this save published."""


@dataclass(slots=True)
class Loaded:
    version: int
    state: TreeState
    changed: set[str] | None = None
    """Ids of the runs changed since the last save (the caller adds them); None: all,
    as for a tree stored in the older one-blob form."""

    def touched(self, run_id: str) -> None:
        if self.changed is not None:
            self.changed.add(run_id)


class TraceStore:
    """The trace worker's side: versioned load and save with a small local cache.

    The cache holds open traces between batches (the usual case: a trace's
    events span many batches), so a batch costs one round trip, not two.
    """

    def __init__(self, *, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self._cache: OrderedDict[str, Loaded] = OrderedDict()

    async def load(
        self, trace_ids: Iterable[str], *, fresh: bool = False, new: Container[str] = ()
    ) -> dict[str, Loaded]:
        """Each trace's state and version (an empty state at version 0 when unknown).

        Traces in ``new`` (their root's start is in hand) are assumed not to be
        stored yet, without asking Redis: if one is (a redelivery), its save
        loses the compare-and-set and the caller reloads it.
        """
        found: dict[str, Loaded] = {}
        missing: list[str] = []
        for trace_id in trace_ids:
            cached = None if fresh else self._cache.get(trace_id)
            if cached is None and not fresh and trace_id in new:
                found[trace_id] = Loaded(0, TreeState(trace_id=trace_id), set())
            elif cached is None:
                missing.append(trace_id)
            else:
                self._cache.move_to_end(trace_id)
                found[trace_id] = cached
        if missing:
            async with self.redis.pipeline(transaction=False) as pipe:
                for trace_id in missing:
                    pipe.hgetall(self._tree(trace_id))
                replies = await pipe.execute()
            for trace_id, fields in zip(missing, replies, strict=True):
                found[trace_id] = _loaded(trace_id, fields)
        return found

    async def save(
        self, loaded: Mapping[str, Loaded], *, now: float, announce: Mapping[str, bytes] = {}
    ) -> Saved:
        """Write each state if its version is unchanged; publish the ``announce`` events
        (encoded ``trace_completed``, by trace id) of those written, once per trace.

        The index and the open-trace set are updated in the same round trip.
        """
        keys, ttl, partitions = self.keys, self.settings.trace_ttl_s, self.settings.partitions
        items = list(loaded.items())
        writes = [(trace_id, item, summarize(item.state)) for trace_id, item in items]
        done = [trace_id for trace_id, _, summary in writes if summary.completed]
        still_open = {trace_id: now for trace_id, _, summary in writes if not summary.completed}
        maxlen = self.settings.stream_maxlen

        def queue_saves(pipe: Any) -> None:
            for trace_id, item, summary in writes:
                p = partition_of(trace_id, partitions)
                script_keys = [keys.tree(trace_id, p), keys.trace_done(trace_id, p), keys.events(p)]
                event = announce.get(trace_id, b"")
                args = [item.version, _trace_fields(item.state), msgspec.json.encode(summary)]
                args += [ttl, event, maxlen, b"1" if item.changed is None else b"0"]
                args += _run_fields(item)
                _SAVE.queue(pipe, script_keys, args)
            pipe.zadd(keys.trace_index(), {trace_id: now for trace_id, _ in items})
            if still_open:
                pipe.zadd(keys.trace_open(), still_open)
            if done:
                pipe.zrem(keys.trace_open(), *done)
            pipe.zremrangebyscore(keys.trace_index(), "-inf", now - ttl)

        try:
            replies = await execute(self.redis, [_SAVE], queue_saves)
        except BaseException:
            for trace_id, _ in items:
                self._cache.pop(trace_id, None)  # unknown outcome: reload next time
            raise
        saved = Saved(conflicts=[], published=[])
        for (trace_id, item), reply in zip(items, replies[: len(items)], strict=True):
            if reply == -1:
                saved.conflicts.append(trace_id)
                self._cache.pop(trace_id, None)
                continue
            item.version = int(reply[0])
            item.changed = set()
            if reply[1] == 1:
                saved.published.append(trace_id)
            self._remember(trace_id, item)
        return saved

    def _tree(self, trace_id: str) -> str:
        return self.keys.tree(trace_id, partition_of(trace_id, self.settings.partitions))

    def forget(self, trace_id: str) -> None:
        self._cache.pop(trace_id, None)

    def _remember(self, trace_id: str, item: Loaded) -> None:
        if is_complete(item.state) or item.state.timed_out:
            self._cache.pop(trace_id, None)  # complete traces rarely change again
            return
        self._cache[trace_id] = item
        self._cache.move_to_end(trace_id)
        while len(self._cache) > self.settings.trace_cache_size:
            self._cache.popitem(last=False)


def _trace_fields(state: TreeState) -> bytes:
    return _state_encoder.encode(
        TreeState(trace_id=state.trace_id, timed_out=state.timed_out, updated_at=state.updated_at)
    )


def _run_fields(item: Loaded) -> list[bytes]:
    runs = item.state.runs
    ids = runs if item.changed is None else [r for r in item.changed if r in runs]
    fields: list[bytes] = []
    for run_id in ids:
        fields += (TREE_RUN_PREFIX + run_id.encode(), _run_encoder.encode(runs[run_id]))
    return fields


def _state_of(trace_id: str, fields: Mapping[bytes, bytes]) -> TreeState | None:
    """A stored tree's state (either form), or None when nothing is stored."""
    if TREE_TRACE in fields:
        state = _state_decoder.decode(fields[TREE_TRACE])
        start = len(TREE_RUN_PREFIX)
        state.runs = {
            name[start:].decode(): _run_decoder.decode(value)
            for name, value in fields.items()
            if name.startswith(TREE_RUN_PREFIX)
        }
        return state
    if STATE_BLOB in fields:
        return _state_decoder.decode(fields[STATE_BLOB])
    return None


def _loaded(trace_id: str, fields: Mapping[bytes, bytes]) -> Loaded:
    state = _state_of(trace_id, fields)
    if state is None or STATE_VERSION not in fields:
        return Loaded(0, TreeState(trace_id=trace_id), set())
    legacy = TREE_TRACE not in fields
    return Loaded(int(fields[STATE_VERSION]), state, None if legacy else set())


# -- read API ----------------------------------------------------------------------


async def get_trace(redis: aioredis.Redis, settings: Settings, trace_id: str) -> Trace | None:
    """The run tree of ``trace_id`` (live or finished), or None when unknown or expired."""
    fields: Any = await redis.hgetall(_tree_key(settings, trace_id))
    state = _state_of(trace_id, fields)
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
    keys = Keys(settings.prefix)
    index = keys.trace_index()
    top, after = _parse_cursor(cursor)
    offset, scanned, chunk = 0, 0, max(limit * 2, 100)
    found: list[TraceSummary] = []
    last = cursor
    while scanned < LIST_SCAN_CAP:
        raw: Any = await redis.zrevrangebyscore(
            index, top, "-inf", start=offset, num=chunk, withscores=True
        )
        offset += len(raw)
        rows = [(text(m), float(s)) for m, s in raw]
        if after is not None:  # equal scores come in descending member order
            rows = [(m, s) for m, s in rows if not (s == top and m >= after)]
        blobs = await _summaries(redis, settings, [m for m, _ in rows])
        gone = [m for (m, _), blob in zip(rows, blobs, strict=True) if blob is None]
        await _prune(redis, index, gone)
        for (member, score), blob in zip(rows, blobs, strict=True):
            scanned += 1
            last = f"{score!r}:{member}"
            if blob is None:
                continue
            summary = _summary_decoder.decode(blob)
            if _matches(summary, status, name, tag, metadata):
                found.append(summary)
                if len(found) == limit:
                    return TracePage(traces=found, next_cursor=last)
        if len(raw) < chunk:
            return TracePage(traces=found, next_cursor=None)
    return TracePage(traces=found, next_cursor=last)


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
    return Keys(settings.prefix).tree(trace_id, partition_of(trace_id, settings.partitions))


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
