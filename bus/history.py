"""Per-topic event history for streaming clients, and its live channel.

A *topic* is one trace or one thread. The fan-out worker appends protocol
events to the topic's history stream and publishes each on the topic's
channel in the same server-side step (one script), so the live message
carries the history entry id: that id is the protocol ``event_id`` and the SSE
``id:``, which is what makes resume exact. Frontends subscribe first, then read
history after the client's position, and merge the two by id.

Entry fields (named in :mod:`bus.keys`): ``HISTORY_SEQ`` the per-topic sequence
number, ``HISTORY_CHANNEL`` the protocol channel (``messages``, ``tools``,
``lifecycle``, ``custom``), ``HISTORY_FINAL`` = ``1`` on the topic's final event,
``HISTORY_PAYLOAD`` the JSON of ``{"method": ..., "params": ...}``. A live message
is the same, tab-separated: entry id, sequence, channel, final flag, payload.

The fan-out worker writes through :class:`GuardedWriter`, which appends the
same entries and publishes the same messages, and saves the trace's
conversion state in the same script run (see :mod:`bus.fanout.handler`).

Live messages go out with ``PUBLISH`` on a standalone Redis and with
``SPUBLISH`` (sharded pub/sub) on a cluster, from the script that appends:
each channel carries its topic's hash tag, so it lives in the slot of the
topic's history and only that shard's node handles it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from bus.connect import publish_command
from bus.keys import (
    HISTORY_CHANNEL,
    HISTORY_FINAL,
    HISTORY_PAYLOAD,
    HISTORY_SEQ,
    Keys,
    lua_fields,
)
from bus.parsing import entry_order, text
from bus.scripts import LuaScript

TopicKind = Literal["trace", "thread"]
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
_ID_PART_MAX = 2**64 - 1
Position = Literal["ok", "missed", "unknown"]


@dataclass(frozen=True, slots=True)
class Topic:
    kind: TopicKind
    id: str

    def history(self, keys: Keys) -> str:
        return keys.history(self.id) if self.kind == "trace" else keys.thread_history(self.id)

    def seq(self, keys: Keys) -> str:
        return (
            keys.history_seq(self.id) if self.kind == "trace" else keys.thread_history_seq(self.id)
        )

    def channel(self, keys: Keys) -> str:
        return keys.channel(self.id) if self.kind == "trace" else keys.thread_channel(self.id)


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One protocol event as stored, ready to be framed for a client."""

    event_id: str
    seq: int
    method: str
    final: bool
    payload: bytes
    _sse: bytes | None = field(default=None, compare=False, repr=False)

    def sse_frame(self) -> bytes:
        """The item as one SSE frame (``id:`` and ``data:``), built once per item.

        The hub hands one item to every client of a channel: each client's
        stream sends these same bytes instead of building its own copy.
        """
        frame = self._sse
        if frame is None:
            frame = b"id: %s\ndata: %s\n\n" % (self.event_id.encode(), self.envelope())
            object.__setattr__(self, "_sse", frame)  # a cache: the item is frozen otherwise
        return frame

    def envelope(self) -> bytes:
        """The protocol envelope ``{type, event_id, seq, method, params}`` as JSON.

        Built by splicing bytes, not by re-encoding: this runs once per event
        per client.
        """
        head = b'{"type":"event","event_id":"%s","seq":%d,' % (self.event_id.encode(), self.seq)
        return head + self.payload[1:]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A protocol event to append: its channel, whether it ends the topic, its JSON."""

    method: str
    payload: bytes
    final: bool = False


# KEYS: history stream, seq counter. ARGV: channel, publish command, maxlen, ttl,
# then (m, f, p) triples. Returns the last entry id.
_APPEND = LuaScript(
    lua_fields("""
local last = ''
local tab = '\\t'
for i = 5, #ARGV, 3 do
  local seq = redis.call('INCR', KEYS[2])
  last = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', '$SEQ', seq,
                    '$CHANNEL', ARGV[i], '$FINAL', ARGV[i + 1], '$PAYLOAD', ARGV[i + 2])
  redis.call(ARGV[2], ARGV[1],
             last .. tab .. seq .. tab .. ARGV[i] .. tab .. ARGV[i + 1] .. tab .. ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return last
""")
)


class HistoryWriter:
    """Appends protocol events to topics (used by tests and benchmarks)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._publish = publish_command(redis)
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_s = ttl_s

    def queue(self, pipe: Any, topic: Topic, events: Sequence[Outgoing]) -> None:
        """Add one append of ``events`` to ``pipe`` (one script run; sent on execute)."""
        if not events:
            return
        args: list[Any] = [topic.channel(self._keys), self._publish, self._maxlen, self._ttl_s]
        for item in events:
            args += [item.method, b"1" if item.final else b"0", item.payload]
        _APPEND.queue(pipe, [topic.history(self._keys), topic.seq(self._keys)], args)


# The fan-out worker's guarded append: a trace's history and its conversion
# state change together or not at all. KEYS: state hash, history stream, seq
# counter (one slot: all tagged with the trace). ARGV: expected state version,
# state blob, state ttl, maxlen, history ttl, channel, publish command, then
# (m, f, p) triples. Returns {new version, last entry id}, or {-1, ''} when the
# stored version is not the expected one (another writer got there first).
_APPLY = LuaScript(
    lua_fields("""
local version = tonumber(redis.call('HGET', KEYS[1], '$VERSION') or '0')
if version ~= tonumber(ARGV[1]) then return {-1, ''} end
local tab = '\\t'
local last = ''
for i = 8, #ARGV, 3 do
  local seq = redis.call('INCR', KEYS[3])
  last = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', '$SEQ', seq,
                    '$CHANNEL', ARGV[i], '$FINAL', ARGV[i + 1], '$PAYLOAD', ARGV[i + 2])
  redis.call(ARGV[7], ARGV[6],
             last .. tab .. seq .. tab .. ARGV[i] .. tab .. ARGV[i + 1] .. tab .. ARGV[i + 2])
end
if #ARGV >= 8 then
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('HSET', KEYS[1], '$VERSION', version + 1, '$BLOB', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {version + 1, last}
""")
)

# The thread copy: a trace's new history entries appended to its thread's topic
# (own ids and seq, never final), exactly once. The thread's keys live in the
# thread's slot, not the trace's, so this is a second script: it runs after the
# trace's own write and records, per trace, the last trace entry it copied.
# KEYS: thread history, thread seq, copied marker. ARGV: trace id, expected
# marker ('' for none), new marker, maxlen, ttl, channel, publish command, then
# (m, p) pairs. Returns 1, or the stored marker when it is not the expected one.
_COPY = LuaScript(
    lua_fields("""
local marker = redis.call('HGET', KEYS[3], ARGV[1]) or ''
if marker ~= ARGV[2] then return marker end
local tab = '\\t'
for i = 8, #ARGV, 2 do
  local seq = redis.call('INCR', KEYS[2])
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
                        '$SEQ', seq, '$CHANNEL', ARGV[i], '$FINAL', '0', '$PAYLOAD', ARGV[i + 1])
  redis.call(ARGV[7], ARGV[6],
             id .. tab .. seq .. tab .. ARGV[i] .. tab .. '0' .. tab .. ARGV[i + 1])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], ARGV[5]) end
return 1
""")
)

SCRIPTS = (_APPEND, _APPLY, _COPY)
"""Every history script, for :func:`bus.scripts.execute` to load on NOSCRIPT."""


class GuardedWriter:
    """Appends a trace's protocol events to its history and saves its state, atomically.

    One script run per trace per batch: the history entries, the trace's
    conversion state and the id of the last bus entry applied are written
    together, and only if the state is still at the version the writer
    loaded. A replica that lost its lease mid-batch is thus refused instead
    of appending a second copy. Every key of the script carries the trace's
    hash tag, so it runs on Redis Cluster too; the trace's thread, whose keys
    carry the thread's tag, is written by :meth:`queue_copy` afterwards.

    The scripts go out as bare EVALSHAs (see :mod:`bus.scripts`); when Redis
    lost its script cache the pipeline fails with ``NoScriptError``, and the
    caller reloads its state, calls :meth:`load` and retries (the version
    guard and the copy marker make the retry safe whichever writes did run).
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._redis = redis
        self._publish = publish_command(redis)
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_s = ttl_s

    async def load(self) -> None:
        """(Re)load the scripts into Redis's script cache (every master's, on a cluster)."""
        for script in SCRIPTS:
            await self._redis.script_load(script.text)

    def queue(
        self,
        pipe: Any,
        *,
        state_key: str,
        version: int,
        state: bytes,
        trace_id: str,
        events: Sequence[Outgoing],
    ) -> None:
        """Add one guarded append to ``pipe``; its reply is [new version or -1, last id]."""
        topic, keys = Topic("trace", trace_id), self._keys
        args: list[Any] = [version, state, self._ttl_s, self._maxlen, self._ttl_s]
        args += [topic.channel(keys), self._publish]
        for item in events:
            args += [item.method, b"1" if item.final else b"0", item.payload]
        _APPLY.queue(pipe, [state_key, topic.history(keys), topic.seq(keys)], args)

    def queue_copy(
        self,
        pipe: Any,
        *,
        trace_id: str,
        thread_id: str,
        after: str,
        last: str,
        items: Sequence[tuple[str, bytes]],
    ) -> None:
        """Add one thread copy to ``pipe``: ``items`` ((method, payload) of the trace's
        entries after ``after``, up to ``last``); its reply is 1 or the stored marker."""
        topic, keys = Topic("thread", thread_id), self._keys
        args: list[Any] = [trace_id, after, last, self._maxlen, self._ttl_s]
        args += [topic.channel(keys), self._publish]
        for method, payload in items:
            args += [method, payload]
        script_keys = [topic.history(keys), topic.seq(keys), keys.thread_copied(thread_id)]
        _COPY.queue(pipe, script_keys, args)


def parse_message(data: bytes) -> StreamItem:
    """A live channel message -> :class:`StreamItem`."""
    event_id, seq, method, final, payload = data.split(b"\t", 4)
    return StreamItem(event_id.decode(), int(seq), method.decode(), final == b"1", payload)


def _item(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamItem:
    event_id = text(entry_id)
    return StreamItem(
        event_id,
        int(fields[HISTORY_SEQ]),
        fields[HISTORY_CHANNEL].decode(),
        fields.get(HISTORY_FINAL) == b"1",
        fields[HISTORY_PAYLOAD],
    )


async def read_after(
    redis: aioredis.Redis, keys: Keys, topic: Topic, after: str | None, *, count: int = 1000
) -> list[StreamItem]:
    """History entries after ``after`` (all of them when None), oldest first."""
    start = f"({after}" if after else "-"
    entries: Any = await redis.xrange(topic.history(keys), min=start, max="+", count=count)
    return [_item(entry_id, fields) for entry_id, fields in entries]


async def position(redis: aioredis.Redis, keys: Keys, topic: Topic, after: str) -> Position:
    """Whether a client at ``after`` can resume without a gap.

    ``ok``: ``after`` is still in history (history only loses its head, so
    everything after it is there too) or history starts right after it.
    ``missed``: older entries were trimmed or expired past that point.
    ``unknown``: the id is malformed or lies beyond the end of history.
    """
    key = topic.history(keys)
    if not is_event_id(after):
        return "unknown"
    try:
        if await redis.xrange(key, min=after, max=after, count=1):
            return "ok"
        first: Any = await redis.xrange(key, min="-", max="+", count=1)
    except aioredis.ResponseError:
        return "unknown"
    if not first:
        return "missed"
    first_id, fields = first[0]
    if entry_order(after) > entry_order(first_id):
        return "unknown"
    return "ok" if int(fields[HISTORY_SEQ]) == 1 else "missed"


def is_event_id(text: str) -> bool:
    """Whether ``text`` is a history entry id (``<ms>-<seq>``, both 64-bit).

    Checked before an id reaches Redis: ``-``, ``+`` and ``(<id>`` mean
    something else to XRANGE.
    """
    if not _EVENT_ID.fullmatch(text):
        return False
    ms, _, seq = text.partition("-")
    return int(ms) <= _ID_PART_MAX and int(seq) <= _ID_PART_MAX
