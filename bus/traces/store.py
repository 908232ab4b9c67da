"""Run trees in Redis: the trace worker's writes (reads: :mod:`bus.traces.queries`).

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

Each partition has its own index, ``keys.trace_index(p)``: a ZSET of trace
ids scored by their last write, in the slot of the partition's trees, so the
save script updates it (and the open-trace set ``keys.trace_open(p)``) with
the tree, and on a Redis Cluster a partition's whole save goes to one node.
The trees expire by TTL; the index drops members older than the TTL on
every write and members whose tree is gone whenever a read meets them.
:func:`~bus.traces.queries.list_traces` merges the partitions' indexes, newest first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from bus.keys import (
    STATE_BLOB,
    STATE_VERSION,
    TREE_RUN_PREFIX,
    TREE_TRACE,
    Keys,
    lua_fields,
    partition_of,
)
from bus.scripts import LuaScript, execute, send
from bus.settings import Settings
from bus.traces.tree import RunFacts, TraceSummary, TreeState, summarize

__all__ = ["Loaded", "Saved", "TraceStore", "state_of"]

_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(TreeState)


_run_encoder = msgspec.msgpack.Encoder()
_run_decoder = msgspec.msgpack.Decoder(RunFacts)

# One call saves every trace of a batch that lives on one partition: all its keys
# share the partition's slot, and the per-call costs (the call itself on both sides,
# the index trim) are paid once per batch, not once per trace.
# KEYS: event stream, trace index, open set, then per trace: tree, done flag.
# ARGV: ttl, stream maxlen, now, the values' sizes ("12,0,345,..."), the values
# end to end. Per trace the values are: expected version, trace fields, summary,
# completed event ('' for none), '1' to drop a legacy state blob, trace id, '1' if
# the trace is complete, n, then n (run field, run) pairs. (Two arguments rather
# than one per value: redis-py packs each argument in Python, slowly, where one
# long argument is passed through as it is; the script cuts it up in C.)
# -> per trace {new version, 1 if the event was published}, or -1 when the version
# moved on (that trace is not written).
_SAVE = LuaScript(
    lua_fields("""
local ttl, maxlen, now, values = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local sizes, at, pos = {}, 0, 1
for size in string.gmatch(ARGV[4], '%d+') do sizes[#sizes + 1] = tonumber(size) end
local function take()
  at = at + 1
  local value = string.sub(values, pos, pos + sizes[at] - 1)
  pos = pos + sizes[at]
  return value
end
local results = {}
for k = 4, #KEYS, 2 do
  local tree, done = KEYS[k], KEYS[k + 1]
  local expected, fields, summary, event = take(), take(), take(), take()
  local drop_blob, id, complete, runs = take(), take(), take(), tonumber(take())
  local v = redis.call('HGET', tree, '$VERSION') or '0'
  if v ~= expected then
    at = at + 2 * runs
    for i = at - 2 * runs + 1, at do pos = pos + sizes[i] end
    results[#results + 1] = -1
  else
    local new = tonumber(v) + 1
    -- One HSET for the trace (in chunks: unpack() is bounded by Lua's C stack).
    local hset = {'$VERSION', new, '$TREE_TRACE', fields, '$SUMMARY', summary}
    for _ = 1, runs do
      hset[#hset + 1] = take()
      hset[#hset + 1] = take()
      if #hset >= 1000 then
        redis.call('HSET', tree, unpack(hset))
        hset = {}
      end
    end
    if #hset > 0 then redis.call('HSET', tree, unpack(hset)) end
    if drop_blob == '1' then redis.call('HDEL', tree, '$BLOB') end
    redis.call('EXPIRE', tree, ttl)
    redis.call('ZADD', KEYS[2], now, id)
    if complete == '1' then
      redis.call('ZREM', KEYS[3], id)
    else
      redis.call('ZADD', KEYS[3], now, id)
    end
    local published = 0
    if event ~= '' and redis.call('SET', done, '1', 'NX', 'EX', ttl) then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', '$ENTRY', event)
      published = 1
    end
    results[#results + 1] = {new, published}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(now) - tonumber(ttl))
return results
""")
)


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
        self.keys = Keys(settings.prefix, settings.partitions)
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

            def build(pipe: Any) -> None:
                for trace_id in missing:
                    pipe.hgetall(self._tree(trace_id))

            replies = await send(self.redis, build)
            for trace_id, fields in zip(missing, replies, strict=True):
                found[trace_id] = _loaded(trace_id, fields)
        return found

    async def save(
        self,
        loaded: Mapping[str, Loaded],
        *,
        now: float,
        announce: Mapping[str, bytes] = {},
        summaries: Mapping[str, TraceSummary] = {},
    ) -> Saved:
        """Write each state if its version is unchanged; publish the ``announce`` events
        (encoded ``trace_completed``, by trace id) of those written, once per trace.
        ``summaries`` may hold the traces' summaries when the caller made them already.

        The save script updates the trace's partition index and open-trace set too.
        """
        keys, partitions = self.keys, self.settings.partitions
        by_partition: dict[int, list[tuple[str, Loaded]]] = {}
        for trace_id, item in loaded.items():
            by_partition.setdefault(partition_of(trace_id, partitions), []).append((trace_id, item))
        head = [self.settings.trace_ttl_s, self.settings.stream_maxlen, repr(now)]
        summary_of = {t: summaries.get(t) or summarize(item.state) for t, item in loaded.items()}

        def queue_saves(pipe: Any) -> None:
            for p, items in by_partition.items():
                script_keys = [keys.events(p), keys.trace_index(p), keys.trace_open(p)]
                values: list[bytes] = []
                for trace_id, item in items:
                    script_keys += (keys.tree(trace_id, p), keys.trace_done(trace_id, p))
                    event = announce.get(trace_id, b"")
                    values += _save_values(trace_id, item, summary_of[trace_id], event)
                sizes = ",".join(map(str, map(len, values)))
                _SAVE.queue(pipe, script_keys, [*head, sizes, b"".join(values)])

        try:
            replies = await execute(self.redis, [_SAVE], queue_saves)
        except BaseException:
            for trace_id in loaded:
                self._cache.pop(trace_id, None)  # unknown outcome: reload next time
            raise
        saved = Saved(conflicts=[], published=[])
        for items, results in zip(by_partition.values(), replies, strict=True):
            for (trace_id, item), result in zip(items, results, strict=True):
                if result == -1:
                    saved.conflicts.append(trace_id)
                    self._cache.pop(trace_id, None)
                    continue
                item.version = int(result[0])
                item.changed = set()
                if result[1] == 1:
                    saved.published.append(trace_id)
                self._remember(trace_id, item, summary_of[trace_id].completed)
        return saved

    def _tree(self, trace_id: str) -> str:
        return self.keys.tree(trace_id, partition_of(trace_id, self.settings.partitions))

    def forget(self, trace_id: str) -> None:
        self._cache.pop(trace_id, None)

    def _remember(self, trace_id: str, item: Loaded, completed: bool) -> None:
        if completed:
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


def _save_values(trace_id: str, item: Loaded, summary: TraceSummary, event: bytes) -> list[bytes]:
    """One trace's values for the save script."""
    runs = _run_fields(item)
    return [
        str(item.version).encode(),
        _trace_fields(item.state),
        msgspec.json.encode(summary),
        event,
        b"1" if item.changed is None else b"0",
        trace_id.encode(),
        b"1" if summary.completed else b"0",
        str(len(runs) // 2).encode(),
        *runs,
    ]


def _run_fields(item: Loaded) -> list[bytes]:
    runs = item.state.runs
    ids = runs if item.changed is None else [r for r in item.changed if r in runs]
    fields: list[bytes] = []
    for run_id in ids:
        fields += (TREE_RUN_PREFIX + run_id.encode(), _run_encoder.encode(runs[run_id]))
    return fields


def state_of(trace_id: str, fields: Mapping[bytes, bytes]) -> TreeState | None:
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
    state = state_of(trace_id, fields)
    if state is None or STATE_VERSION not in fields:
        return Loaded(0, TreeState(trace_id=trace_id), set())
    legacy = TREE_TRACE not in fields
    return Loaded(int(fields[STATE_VERSION]), state, None if legacy else set())
