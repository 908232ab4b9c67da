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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from bus.keys import (
    HISTORY_CHANNEL,
    HISTORY_FINAL,
    HISTORY_PAYLOAD,
    HISTORY_SEQ,
    Keys,
    lua_fields,
)
from bus.parsing import entry_order, text

TopicKind = Literal["trace", "thread"]
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


# KEYS: history stream, seq counter. ARGV: channel, maxlen, ttl, then (m, f, p) triples.
_APPEND = lua_fields("""
local last = ''
for i = 4, #ARGV, 3 do
  local seq = redis.call('INCR', KEYS[2])
  last = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', '$SEQ', seq,
                    '$CHANNEL', ARGV[i], '$FINAL', ARGV[i + 1], '$PAYLOAD', ARGV[i + 2])
  local tab = '\\t'
  redis.call('PUBLISH', ARGV[1],
             last .. tab .. seq .. tab .. ARGV[i] .. tab .. ARGV[i + 1] .. tab .. ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return last
""")


class HistoryWriter:
    """Appends protocol events to topics (used by the fan-out worker)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._script = redis.register_script(_APPEND)
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_s = ttl_s

    async def queue(self, pipe: Any, topic: Topic, events: Sequence[Outgoing]) -> None:
        """Add one append of ``events`` to ``pipe`` (one script run; sent on execute)."""
        if not events:
            return
        args: list[Any] = [topic.channel(self._keys), self._maxlen, self._ttl_s]
        for item in events:
            args += [item.method, b"1" if item.final else b"0", item.payload]
        await self._script(
            keys=[topic.history(self._keys), topic.seq(self._keys)], args=args, client=pipe
        )


# The fan-out worker's guarded append: the topics of one trace and that trace's
# conversion state change together or not at all. KEYS: state hash, then
# (history stream, seq counter) per topic. ARGV: expected state version, state
# blob, state ttl, maxlen, ttl, topic count n, n channels, then (m, f, p)
# triples. Only the first topic (the trace) keeps the final flag: a thread
# outlives each of its traces. Returns the new version, or -1 when the stored
# version is not the expected one (another writer got there first).
_APPLY = lua_fields("""
local version = tonumber(redis.call('HGET', KEYS[1], '$VERSION') or '0')
if version ~= tonumber(ARGV[1]) then return -1 end
local n = tonumber(ARGV[6])
local first = 7 + n
local tab = '\\t'
for t = 1, n do
  local hist, seqkey, channel = KEYS[2 * t], KEYS[2 * t + 1], ARGV[6 + t]
  for i = first, #ARGV, 3 do
    local final = ARGV[i + 1]
    if t > 1 then final = '0' end
    local seq = redis.call('INCR', seqkey)
    local id = redis.call('XADD', hist, 'MAXLEN', '~', ARGV[4], '*', '$SEQ', seq,
                          '$CHANNEL', ARGV[i], '$FINAL', final, '$PAYLOAD', ARGV[i + 2])
    redis.call('PUBLISH', channel,
               id .. tab .. seq .. tab .. ARGV[i] .. tab .. final .. tab .. ARGV[i + 2])
  end
  if #ARGV >= first then
    redis.call('EXPIRE', hist, ARGV[5])
    redis.call('EXPIRE', seqkey, ARGV[5])
  end
end
redis.call('HSET', KEYS[1], '$VERSION', version + 1, '$BLOB', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return version + 1
""")


class GuardedWriter:
    """Appends a trace's protocol events to its topics and saves its state, atomically.

    One script run per trace per batch: the history entries of every topic,
    the trace's conversion state and the id of the last bus entry applied are
    written together, and only if the state is still at the version the
    writer loaded. A replica that lost its lease mid-batch is thus refused
    instead of appending a second copy. Keys of several topics in one script
    need a single-node Redis (or a thread id hash-tagged like its traces).

    The script goes out as a bare EVALSHA: redis-py's pipelined scripts ask
    ``SCRIPT EXISTS`` before every pipeline, one more round trip per batch on
    the fan-out's hot path. When Redis lost its script cache (restart,
    ``SCRIPT FLUSH``) the pipeline fails with ``NoScriptError``; the caller
    then reloads its state, calls :meth:`load` and retries (the version guard
    makes the retry safe whichever of the pipeline's writes did run).
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self._redis = redis
        self._sha = hashlib.sha1(_APPLY.encode()).hexdigest()
        self._keys = keys
        self._maxlen = maxlen
        self._ttl_s = ttl_s

    async def load(self) -> None:
        """(Re)load the script into Redis's script cache."""
        await self._redis.script_load(_APPLY)

    def queue(
        self,
        pipe: Any,
        *,
        state_key: str,
        version: int,
        state: bytes,
        topics: Sequence[Topic],
        events: Sequence[Outgoing],
    ) -> None:
        """Add one guarded append to ``pipe``; its reply is the new version or -1."""
        keys = [state_key]
        args: list[Any] = [version, state, self._ttl_s, self._maxlen, self._ttl_s, len(topics)]
        for topic in topics:
            keys += [topic.history(self._keys), topic.seq(self._keys)]
            args.append(topic.channel(self._keys))
        for item in events:
            args += [item.method, b"1" if item.final else b"0", item.payload]
        pipe.evalsha(self._sha, len(keys), *keys, *args)


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
