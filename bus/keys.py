"""Every Redis key and channel name the bus uses, built in one place.

Keys that belong to one partition, one trace, one thread or one webhook
endpoint carry a hash tag (``{...}``), so that the layout runs unchanged on
Redis Cluster and every script touches one slot:

- a partition's keys (its event stream, leases, run trees, trace index and
  open set, completion flags) share the partition's tag: the trace worker's
  save script writes a tree and appends ``trace_completed`` to the stream;
- a trace's history, seq counter, live channel and fan-out state share
  ``{trace_id}``; a thread's share ``{thread_id}`` (the thread copy is a
  second script in the thread's slot, see :mod:`bus.history`);
- an endpoint's record, attempt log and limits share ``{endpoint_id}``.

Partition tags are chosen so that P partitions spread evenly over a
cluster's masters (plain ``{0}``..``{7}`` hash to slots that can crowd on
one node): partition ``i`` gets the shortest tag ``"i.<suffix>"`` whose
CRC16 slot lies within ``16384 / (16 P)`` of the centre of the ``i``-th of
P equal slot ranges, ``(i + 1/2) * 16384 / P``. A cluster whose masters
own equal consecutive ranges (what ``redis-cli --cluster create`` makes)
then gets ``P / N`` partitions per master, within one.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import string
import zlib
from dataclasses import dataclass
from string import Template

ENTRY_FIELD = b"e"
"""The one field of an event stream entry (and a dead letter): the encoded event."""

# Fields of the versioned state hashes: the fan-out state of a trace
# (``Keys.fanout_state``) and a run tree (``Keys.tree``).
STATE_VERSION = b"v"
"""Version counter; every guarded write compares it and increments it."""
STATE_BLOB = b"s"
"""The msgpack state itself."""
TREE_SUMMARY = b"m"
"""A run tree's JSON summary, which the trace list filters read."""
TREE_TRACE = b"t"
"""A run tree's own fields: the msgpack state without its runs (each run has a field
of its own, ``TREE_RUN_PREFIX`` + run id; a tree stored by an older version keeps
the whole state in ``STATE_BLOB``)."""
TREE_RUN_PREFIX = b"r:"
"""Prefix of a run tree's per-run fields: ``r:<run id>``, the run's msgpack facts."""

# Fields of a topic's history entry (``Keys.history``, ``Keys.thread_history``).
HISTORY_SEQ = b"s"
"""Per-topic sequence number, from 1."""
HISTORY_CHANNEL = b"m"
"""The protocol channel (``messages``, ``tools``, ``lifecycle``, ``custom``)."""
HISTORY_FINAL = b"f"
"""``1`` on the topic's final event, else ``0``."""
HISTORY_PAYLOAD = b"p"
"""The JSON of ``{"method": ..., "params": ...}``."""

ATTEMPT_FIELD = b"a"
"""The one field of a webhook attempt-log entry (``Keys.attempts``): the attempt's JSON."""

# Fields of an endpoint's rate window (``Keys.endpoint_rate``).
RATE_SECOND = b"s"
"""The Unix second the window counts."""
RATE_COUNT = b"n"
"""Deliveries started in that second."""


def lua_fields(script: str) -> str:
    """``script`` with its field placeholders (``$ENTRY``, ``$VERSION``, ...) filled in.

    Scripts name the fields through these placeholders so that the names live
    here only (``$`` appears nowhere else in Lua source; an unknown placeholder
    raises ``KeyError``).
    """
    return Template(script).substitute(_LUA_FIELDS)


_LUA_FIELDS = {
    "ENTRY": ENTRY_FIELD.decode(),
    "VERSION": STATE_VERSION.decode(),
    "BLOB": STATE_BLOB.decode(),
    "SUMMARY": TREE_SUMMARY.decode(),
    "TREE_TRACE": TREE_TRACE.decode(),
    "SEQ": HISTORY_SEQ.decode(),
    "CHANNEL": HISTORY_CHANNEL.decode(),
    "FINAL": HISTORY_FINAL.decode(),
    "PAYLOAD": HISTORY_PAYLOAD.decode(),
    "ATTEMPT": ATTEMPT_FIELD.decode(),
    "RATE_SECOND": RATE_SECOND.decode(),
    "RATE_COUNT": RATE_COUNT.decode(),
}

SLOTS = 16384
"""Redis Cluster's hash slots."""

_TAG_ALPHABET = string.digits + string.ascii_lowercase


def partition_of(trace_id: str, partitions: int) -> int:
    """The event partition that carries every event of ``trace_id``.

    CRC32 is stable across processes and Python versions (unlike ``hash``),
    which is what keeps one trace on one partition everywhere.
    """
    return zlib.crc32(trace_id.encode()) % partitions


def key_slot(key: str) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, or of the whole key)."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


@functools.lru_cache(maxsize=32)
def partition_tags(partitions: int) -> tuple[str, ...]:
    """The hash tag of each of ``partitions`` partitions (see the module docstring)."""
    width = SLOTS / partitions
    tolerance = max(1, SLOTS // (16 * partitions))
    return tuple(
        _nearest_tag(str(i), round((i + 0.5) * width), tolerance) for i in range(partitions)
    )


def _nearest_tag(base: str, target: int, tolerance: int) -> str:
    best, best_distance = base, abs(key_slot(base) - target)
    for length in range(1, 4):
        for suffix in itertools.product(_TAG_ALPHABET, repeat=length):
            if best_distance <= tolerance:
                return best
            tag = f"{base}.{''.join(suffix)}"
            distance = abs(key_slot(tag) - target)
            if distance < best_distance:
                best, best_distance = tag, distance
    return best


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one prefix.

    ``partitions`` is needed by the partitioned keys (their hash tags depend
    on it: see :func:`partition_tags`); every process of a deployment must
    use the same value, as it must for :func:`partition_of` anyway.
    """

    prefix: str = "lcbus"
    partitions: int = 0

    def partition_tag(self, partition: int) -> str:
        if self.partitions < 1:
            raise ValueError("Keys(prefix, partitions) is needed for partitioned keys")
        return partition_tags(self.partitions)[partition]

    # Event streams and the consumer runtime.
    def events(self, partition: int) -> str:
        return f"{self.prefix}:events:{{{self.partition_tag(partition)}}}"

    def lease(self, group: str, partition: int) -> str:
        return f"{self.prefix}:lease:{group}:{{{self.partition_tag(partition)}}}"

    def members(self, group: str) -> str:
        return f"{self.prefix}:members:{group}"

    def dlq(self, group: str) -> str:
        return f"{self.prefix}:dlq:{group}"

    def stats(self, group: str) -> str:
        return f"{self.prefix}:stats:{group}"

    def arq_queue(self, worker: str) -> str:
        return f"{self.prefix}:arq:{worker}"

    def arq(self, name: str) -> str:
        """One of arq's own keys (``arq:job:<id>``, ``arq:result:<id>``, ``arq:abort``,
        ...), moved under the prefix."""
        return f"{self.prefix}:{name}"

    def publisher(self, source: str) -> str:
        """Expiring stats of one publishing process (for ``lcbus status``)."""
        return f"{self.prefix}:publisher:{source}"

    def publisher_pattern(self) -> str:
        return f"{self.prefix}:publisher:*"

    # Per trace (streaming history, live channel, run tree).
    def history(self, trace_id: str) -> str:
        return f"{self.prefix}:history:{{{trace_id}}}"

    def channel(self, trace_id: str) -> str:
        return f"{self.prefix}:live:{{{trace_id}}}"

    def history_seq(self, trace_id: str) -> str:
        return f"{self.prefix}:history-seq:{{{trace_id}}}"

    def fanout_state(self, trace_id: str) -> str:
        """The fan-out worker's conversion state of a trace (``STATE_VERSION``, ``STATE_BLOB``)."""
        return f"{self.prefix}:fanout:{{{trace_id}}}"

    def thread_history(self, thread_id: str) -> str:
        return f"{self.prefix}:thread:{{{thread_id}}}"

    def thread_history_seq(self, thread_id: str) -> str:
        return f"{self.prefix}:thread-seq:{{{thread_id}}}"

    def thread_channel(self, thread_id: str) -> str:
        return f"{self.prefix}:thread-live:{{{thread_id}}}"

    def thread_copied(self, thread_id: str) -> str:
        """Hash: trace id -> the last trace history entry copied into the thread."""
        return f"{self.prefix}:thread-copied:{{{thread_id}}}"

    def tree(self, trace_id: str, partition: int) -> str:
        """A trace's run tree. Tagged with its event partition, not the trace: the
        trace worker's one script saves it and publishes ``trace_completed`` there."""
        return f"{self.prefix}:tree:{{{self.partition_tag(partition)}}}:{trace_id}"

    def trace_index(self, partition: int) -> str:
        """ZSET of a partition's trace ids scored by the time their tree was last
        written (one per partition: it lives in the slot its trees are saved to)."""
        return f"{self.prefix}:traces:{{{self.partition_tag(partition)}}}"

    def trace_open(self, partition: int) -> str:
        """ZSET of a partition's trace ids not complete yet, scored like the index
        (for the timeout sweep)."""
        return f"{self.prefix}:traces-open:{{{self.partition_tag(partition)}}}"

    def trace_done(self, trace_id: str, partition: int) -> str:
        """Flag set when ``trace.completed`` was published; tagged like the event partition
        so that one script sets it and appends the event."""
        return f"{self.prefix}:trace-done:{{{self.partition_tag(partition)}}}:{trace_id}"

    # Webhooks.
    def endpoints(self) -> str:
        return f"{self.prefix}:wh:endpoints"

    def endpoints_version(self) -> str:
        """A counter every change to the endpoint registry increments (see the router)."""
        return f"{self.prefix}:wh:endpoints:version"

    def endpoint(self, endpoint_id: str) -> str:
        return f"{self.prefix}:wh:endpoint:{{{endpoint_id}}}"

    def attempts(self, endpoint_id: str) -> str:
        return f"{self.prefix}:wh:attempts:{{{endpoint_id}}}"

    def webhook_dlq(self) -> str:
        return f"{self.prefix}:wh:dead"

    def webhook_message(self, message_id: str) -> str:
        return f"{self.prefix}:wh:msg:{{{message_id}}}"

    def webhook_run(self, run_id: str) -> str:
        """A run's tags and metadata, for endpoints that filter its token events on them."""
        return f"{self.prefix}:wh:run:{{{run_id}}}"

    # Per-endpoint delivery limits; same hash tag as the endpoint, so one
    # script may touch them all on Redis Cluster.
    def endpoint_slots(self, endpoint_id: str) -> str:
        """Sorted set of in-flight deliveries (member = attempt token, score = lease end)."""
        return f"{self.prefix}:wh:slots:{{{endpoint_id}}}"

    def endpoint_rate(self, endpoint_id: str) -> str:
        """Deliveries started in the current second."""
        return f"{self.prefix}:wh:rate:{{{endpoint_id}}}"

    def endpoint_pause(self, endpoint_id: str) -> str:
        """Set while the endpoint asked us to slow down (429/502/503/504)."""
        return f"{self.prefix}:wh:pause:{{{endpoint_id}}}"

    def endpoint_throttle(self, endpoint_id: str) -> str:
        """How many slow-down answers in a row; limits the endpoint to one delivery at a time."""
        return f"{self.prefix}:wh:throttle:{{{endpoint_id}}}"

    def all_keys_pattern(self) -> str:
        """A SCAN pattern matching every key under this prefix."""
        return f"{self.prefix}:*"
