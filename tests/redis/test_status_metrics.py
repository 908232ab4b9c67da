"""collect_status and the Prometheus exporter against real Redis."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Sequence

import redis
import redis.asyncio as aioredis

from bus.demo.ports import free_port
from bus.keys import Keys
from bus.runtime.consumer import Delivery, GroupConsumer
from bus.runtime.metrics import MetricsExporter
from bus.runtime.status import collect_status
from bus.settings import Settings
from tests.support.publishing import publish, traces_events


async def test_status_reports_lag_pending_and_dead_letters(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    publish(sync_redis, settings, traces_events(8, 10))
    keys = Keys(settings.prefix, settings.partitions)
    for p in range(settings.partitions):
        sync_redis.xgroup_create(keys.events(p), "late", id="0", mkstream=True)
    # Read 3 entries of partition 0 without acking: pending 3, lag down by 3.
    stream0 = keys.events(0)
    sync_redis.xreadgroup("late", "p0", {stream0: ">"}, count=3)
    sync_redis.xadd(f"{settings.prefix}:dlq:late", {b"reason": b"x"})

    status = await collect_status(async_redis, settings)
    (group,) = status.groups
    assert group.name == "late"
    assert sum(status.stream_lengths) == 80
    assert group.pending == 3
    assert group.lag == 80 - 3
    assert group.partitions[0].lag == status.stream_lengths[0] - 3
    assert group.dead_letters == 1
    assert status.to_dict()["groups"][0]["lag"] == 77


async def test_exporter_serves_counters_and_group_gauges(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = settings.replace(read_block_ms=100)
    seen: list[Delivery] = []
    all_seen = asyncio.Event()

    async def handler(batch: Sequence[Delivery]) -> None:
        seen.extend(batch)
        if len(seen) >= 20:
            all_seen.set()

    publish(sync_redis, settings, traces_events(4, 5))
    async with GroupConsumer(
        redis=async_redis, settings=settings, group="m", handler=handler
    ) as consumer:
        await asyncio.wait_for(all_seen.wait(), 15)
        port = free_port()
        exporter = MetricsExporter(
            consumer=consumer, redis=async_redis, settings=settings, port=port
        )
        await exporter.start()
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
        finally:
            await exporter.aclose()
    assert 'lcbus_consumer_processed_total{group="m"} 20.0' in body
    assert 'lcbus_group_lag{group="m",partition="0"} 0.0' in body
    assert 'lcbus_group_dead_letters{group="m"} 0.0' in body


async def test_status_shows_publisher_stats(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    from bus.producer.publisher import Publisher

    publisher = Publisher(settings=settings)
    publisher.publish(0, b"payload")
    assert publisher.flush(5)
    publisher._report_stats()  # the flusher does this every few seconds
    status = await collect_status(async_redis, settings)
    (reported,) = status.publishers
    assert reported["source"] == publisher.source
    assert (reported["published"], reported["dropped"]) == (1, 0)
    publisher.close()
