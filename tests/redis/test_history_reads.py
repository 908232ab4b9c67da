"""A frontend's history reads: clients asking for the same page at once share one read."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from bus.frontend.reads import HistoryReads
from bus.history import Topic
from bus.keys import Keys
from tests.support.frontend import append, conversation


class _CountedReads:
    """The Redis client, with its XRANGE calls counted and held until ``release``."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self.calls = 0
        self.release = asyncio.Event()

    async def xrange(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        await self.release.wait()
        return await self._redis.xrange(*args, **kwargs)


async def test_identical_reads_in_flight_share_one_xrange(
    prefix: str, async_redis: aioredis.Redis
) -> None:
    topic = Topic("trace", "t-shared")
    events = conversation([f"w{i} " for i in range(30)])
    await append(async_redis, prefix, [topic], events, batch=len(events))
    counted = _CountedReads(async_redis)
    reads, keys = HistoryReads(4), Keys(prefix)

    def page(after: str | None = None) -> asyncio.Task[Any]:
        return asyncio.ensure_future(reads.page(counted, keys, topic, after, count=1000))  # type: ignore[arg-type]

    same = [page() for _ in range(50)]
    leaver = page()  # a client that goes away while the read is in flight
    await asyncio.sleep(0.05)
    assert counted.calls == 1
    leaver.cancel()
    counted.release.set()
    pages = await asyncio.gather(*same)
    assert all(p == pages[0] for p in pages)
    assert [item.seq for item in pages[0]] == list(range(1, len(events) + 1))

    # Once answered, the next read asks Redis again (history grows); another position too.
    again = await page()
    later = await page(pages[0][9].event_id)
    assert counted.calls == 3
    assert again == pages[0] and [item.seq for item in later] == list(range(11, len(events) + 1))
