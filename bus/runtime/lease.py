"""Partition leases and group membership for the consumer runtime.

Each partition of a consumer group has one lease key holding the replica id of
its owner, set with ``SET NX PX`` and kept alive with a compare-and-pexpire
script; only the owner may renew or delete it. Replicas also heartbeat into a
ZSET scored by expiry (on the Redis clock, so replicas with skewed clocks agree)
and derive the same partition assignment from the same sorted member list.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from bus.connect import is_cluster_client
from bus.keys import Keys
from bus.parsing import text
from bus.runtime.holds import TraceHolds
from bus.runtime.outage import TRANSIENT_ERRORS
from bus.scripts import LuaScript, execute

# Taking a lease we already hold (say after a short outage where our local
# deadline passed but the key survived) must succeed, hence the GET first.
_ACQUIRE = """
local owner = redis.call('get', KEYS[1])
if owner == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return 1
end
if owner then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return 1
"""

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# The Redis clock scores every member, so expiry does not depend on the
# replicas agreeing on the time. The ZSET itself expires once nobody beats.
_HEARTBEAT = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('zadd', KEYS[1], now + ttl, ARGV[1])
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('pexpire', KEYS[1], ttl * 2)
return redis.call('zrange', KEYS[1], 0, -1)
"""


def default_replica_id() -> str:
    """host:pid:nonce, unique per process and readable in ``lcbus status``."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def assign(partitions: int, members: Sequence[str], me: str) -> frozenset[int]:
    """The partitions ``me`` should own: p where sorted(members)[p % n] is me.

    Every replica computes this from the same member list, so in a steady
    state each partition has exactly one candidate owner.
    """
    ordered = sorted(set(members))
    if me not in ordered:
        return frozenset()
    n = len(ordered)
    return frozenset(p for p in range(partitions) if ordered[p % n] == me)


_RENEW_SCRIPT = LuaScript(_RENEW)


class Leases:
    """Lease and membership operations of one replica in one group."""

    def __init__(
        self, *, redis: aioredis.Redis, keys: Keys, group: str, replica_id: str, ttl_ms: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.group = group
        self.replica_id = replica_id
        self.ttl_ms = ttl_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._renew = redis.register_script(_RENEW)

    async def heartbeat(self) -> list[str]:
        """Announce this replica and return the live members, sorted."""
        raw = await self._heartbeat(
            keys=[self._keys.members(self.group)], args=[self.replica_id, self.ttl_ms]
        )
        return sorted(text(m) for m in raw)

    async def leave(self) -> None:
        await self._redis.zrem(self._keys.members(self.group), self.replica_id)

    async def acquire(self, partition: int) -> bool:
        key = self._keys.lease(self.group, partition)
        return bool(await self._acquire(keys=[key], args=[self.replica_id, self.ttl_ms]))

    async def renew(self, partitions: Iterable[int]) -> dict[int, bool]:
        """Renew several leases; False means the lease is lost.

        One round trip on a standalone Redis. On a cluster each lease is renewed
        by its own call, all at once: a pipeline fails as a whole when one node
        it touches is down, which would let the leases on the healthy masters
        lapse too. A lease whose node did not answer is left out of the result
        (neither renewed nor lost: its local deadline runs on); the error is
        raised only when no lease could be renewed at all.
        """
        parts = list(partitions)
        if not parts:
            return {}
        if is_cluster_client(self._redis):
            return await self._renew_each(parts)

        def build(pipe: Any) -> None:
            for p in parts:
                _RENEW_SCRIPT.queue(
                    pipe, [self._keys.lease(self.group, p)], [self.replica_id, self.ttl_ms]
                )

        # Pipelined as bare EVALSHAs: cluster pipelines refuse redis-py's Script objects.
        results = await execute(self._redis, [_RENEW_SCRIPT], build)
        return {p: bool(r) for p, r in zip(parts, results, strict=True)}

    async def _renew_each(self, parts: list[int]) -> dict[int, bool]:
        args: list[str | int] = [self.replica_id, self.ttl_ms]
        replies = await asyncio.gather(
            *(self._renew(keys=[self._keys.lease(self.group, p)], args=args) for p in parts),
            return_exceptions=True,
        )
        renewed = {p: bool(r) for p, r in zip(parts, replies, strict=True) if _answered(r)}
        if not renewed:  # every node involved is unreachable: an outage after all
            raise next(r for r in replies if isinstance(r, BaseException))
        return renewed

    async def release(self, partition: int) -> bool:
        key = self._keys.lease(self.group, partition)
        return bool(await self._release(keys=[key], args=[self.replica_id]))

    async def owner(self, partition: int) -> str | None:
        raw = await self._redis.get(self._keys.lease(self.group, partition))
        return None if raw is None else text(raw)


def _answered(reply: object) -> bool:
    """A script's reply, or an error other than the node being unreachable (re-raised)."""
    if isinstance(reply, TRANSIENT_ERRORS):
        return False
    if isinstance(reply, BaseException):
        raise reply
    return True


class LeaseLost(Exception):
    """The partition's lease is no longer ours: drop the batch unacknowledged."""


class HeldPartition:
    """A partition this replica holds: its local lease deadline and its reader task."""

    __slots__ = (
        "holds",
        "index",
        "lost",
        "next_pending_check",
        "reading_ahead",
        "release",
        "task",
        "unacked",
        "valid_until",
    )

    def __init__(self, index: int, valid_until: float, what: str = "") -> None:
        self.index = index
        self.valid_until = valid_until
        self.lost = False
        self.release = False
        self.task: asyncio.Task[None] | None = None
        # Ids handled but not yet acknowledged: the XACK rides along with the
        # next read (one round trip per batch instead of two).
        self.unacked: list[bytes] = []
        # When an idle reader next looks for entries parked in its pending list.
        self.next_pending_check = 0.0
        # The last read made ahead found entries: the partition is busy (see the reader).
        self.reading_ahead = False
        # Traces whose work fails on their own node: held back, the rest flows on.
        # Gone with the lease: the next holder re-reads their entries from pending.
        self.holds = TraceHolds(what or f"partition {index}")

    def remaining_s(self) -> float:
        return -1.0 if self.lost else self.valid_until - time.monotonic()

    def check(self) -> None:
        if self.remaining_s() <= 0:
            raise LeaseLost(self.index)
