"""A worker's start-up and shutdown, run in process: the cleanup a stage registers."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import redis.asyncio as aioredis
from arq.connections import RedisSettings, create_pool

from bus.keys import Keys
from bus.runtime.consumer import BatchHandler, Delivery
from bus.runtime.worker import WorkerContext, consumer_worker_settings, worker_context
from bus.settings import Settings
from tests.support.waiting import wait_until_async


async def test_shutdown_stops_the_consumer_before_the_stage_cleanup(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    keys = Keys(settings.prefix)
    seen_at_cleanup: list[tuple[int, bool]] = []

    async def stage_cleanup(ctx: WorkerContext) -> None:
        # The consumer has left its group and the worker's client still works.
        members = await ctx.redis.zcard(keys.members("probe"))
        seen_at_cleanup.append((members, await ctx.redis.ping()))

    async def build(ctx: WorkerContext) -> BatchHandler:
        ctx.cleanup.push_async_callback(stage_cleanup, ctx)

        async def handle(batch: Sequence[Delivery]) -> None:
            return None

        return handle

    cls = consumer_worker_settings(
        worker="probe", group="probe", build_handler=build, settings=settings
    )
    arq_redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    ctx = {"redis": arq_redis}
    loop = asyncio.get_running_loop()
    try:
        await cls.on_startup(ctx)
        consumer = worker_context(ctx).consumer
        assert consumer is not None
        await wait_until_async(
            lambda: consumer.owned_partitions == frozenset(range(settings.partitions)),
            what="the consumer owns every partition",
        )
        assert await async_redis.zcard(keys.members("probe")) == 1
        await cls.on_shutdown(ctx)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await arq_redis.aclose()
    assert seen_at_cleanup == [(0, True)]
    assert await async_redis.exists(*(keys.lease("probe", p) for p in range(4))) == 0
