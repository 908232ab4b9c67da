"""What the consumer groups are doing, read from Redis alone.

One function, :func:`collect_status`, serves ``lcbus status`` and the
workers' Prometheus gauges, so both report the same numbers: per group and
partition the lag (entries not yet delivered to the group), the pending count
(delivered, not yet acknowledged) and the lease owner; per group the members
and the dead-letter length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis

from bus.keys import Keys
from bus.parsing import text
from bus.settings import Settings

LAG_SCAN_CAP = 10_000
"""Where Redis cannot report lag, count at most this many undelivered entries."""


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    lag: int
    pending: int
    last_delivered_id: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class GroupStatus:
    name: str
    partitions: list[PartitionStatus]
    members: list[str]
    dead_letters: int

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.partitions)


@dataclass(frozen=True, slots=True)
class BusStatus:
    prefix: str
    stream_lengths: list[int]
    groups: list[GroupStatus] = field(default_factory=list)
    publishers: list[dict[str, Any]] = field(default_factory=list)
    """Stats each live publishing process left in Redis (refreshed every few seconds)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for group, raw in zip(self.groups, data["groups"], strict=True):
            raw["lag"] = group.lag
            raw["pending"] = group.pending
        return data


async def _group_infos(
    redis: aioredis.Redis, keys: Keys, partitions: int
) -> tuple[list[int], list[dict[str, dict[str, Any]]]]:
    """Stream lengths and, per partition, XINFO GROUPS keyed by group name."""
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(partitions):
            pipe.xlen(keys.events(p))
            pipe.xinfo_groups(keys.events(p))
        replies = await pipe.execute(raise_on_error=False)
    lengths: list[int] = []
    infos: list[dict[str, dict[str, Any]]] = []
    for p in range(partitions):
        length, groups = replies[2 * p], replies[2 * p + 1]
        lengths.append(length if isinstance(length, int) else 0)
        # A stream nobody published to yet has no groups (the reply is an error).
        rows = groups if isinstance(groups, list) else []
        infos.append({text(g["name"]): g for g in rows})
    return lengths, infos


async def _lag(redis: aioredis.Redis, stream: str, info: dict[str, Any]) -> int:
    lag = info.get("lag")
    if isinstance(lag, int):
        return lag
    # Redis < 7 has no lag, and 7 reports none after deletions inside the
    # undelivered range: count what lies after the last delivered id.
    start = "(" + text(info.get("last-delivered-id", "0-0"))
    return len(await redis.xrange(stream, min=start, count=LAG_SCAN_CAP) or [])


async def collect_status(
    redis: aioredis.Redis, settings: Settings, *, groups: Sequence[str] | None = None
) -> BusStatus:
    """The status of ``groups`` (default: every group found on the partition streams)."""
    keys = Keys(settings.prefix)
    lengths, infos = await _group_infos(redis, keys, settings.partitions)
    names = sorted({name for per_partition in infos for name in per_partition})
    status = BusStatus(prefix=settings.prefix, stream_lengths=lengths)
    for name in names if groups is None else groups:
        status.groups.append(await _group_status(redis, settings, keys, name, infos))
    status.publishers.extend(await _publishers(redis, keys))
    return status


async def _publishers(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    found = [key async for key in redis.scan_iter(match=keys.publisher_pattern(), count=500)]
    if not found:
        return []
    stats = []
    for key, raw in zip(found, await redis.mget(found), strict=True):
        if raw is not None:  # expired between SCAN and MGET
            source = text(key).rsplit(":publisher:", 1)[-1]
            stats.append({"source": source, **msgspec.json.decode(raw)})
    return sorted(stats, key=lambda s: str(s["source"]))


async def _group_status(
    redis: aioredis.Redis,
    settings: Settings,
    keys: Keys,
    name: str,
    infos: list[dict[str, dict[str, Any]]],
) -> GroupStatus:
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(settings.partitions):
            pipe.get(keys.lease(name, p))
        pipe.zrangebyscore(keys.members(name), int(time.time() * 1000), "+inf")
        pipe.xlen(keys.dlq(name))
        replies = await pipe.execute()
    owners, members, dlq_length = replies[:-2], replies[-2], replies[-1]
    partitions = []
    for p in range(settings.partitions):
        info = infos[p].get(name, {})
        partitions.append(
            PartitionStatus(
                partition=p,
                lag=await _lag(redis, keys.events(p), info) if info else 0,
                pending=int(info.get("pending", 0)),
                last_delivered_id=text(info.get("last-delivered-id", "")),
                owner=None if owners[p] is None else text(owners[p]),
            )
        )
    return GroupStatus(
        name=name,
        partitions=partitions,
        members=[text(m) for m in cast(list[Any], members)],
        dead_letters=int(dlq_length),
    )
