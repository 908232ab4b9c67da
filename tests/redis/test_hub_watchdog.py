"""The frontend hub finds a pub/sub connection that went silent (no RST, no reply).

Its reader waits for replies with no timeout; a watchdog PINGs a connection
that has been quiet for a ping interval and, when no reply comes within
another one, replaces the connection. The subscribers then resync from history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from bus.frontend.hub import Hub
from bus.frontend.subscriber import Subscriber
from bus.history import StreamItem
from tests.support.redis_server import OwnedRedis


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    with OwnedRedis() as server:
        server.start()
        yield server


async def _next_live(sub: Subscriber, within: float) -> StreamItem:
    async def wait() -> StreamItem:
        while True:
            item = await sub.next()
            if item is not None:
                return item
            sub.resync = False  # as a replay would

    return await asyncio.wait_for(wait(), within)


async def test_a_silent_pubsub_connection_is_replaced(
    owned_redis: OwnedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    redis = aioredis.Redis.from_url(owned_redis.url, socket_timeout=1, socket_connect_timeout=1)
    publisher = aioredis.Redis.from_url(owned_redis.url)
    caplog.set_level(logging.WARNING, logger="bus.frontend.hub")
    try:
        async with (
            Hub(redis, queue_size=16, ping_interval_s=0.3, name="watchdog-test") as hub,
            hub.subscribe("c") as sub,
        ):
            sub.resync = False
            await publisher.publish("c", b"1-1\t1\tmessages\t0\t{}")
            assert (await _next_live(sub, within=5)).seq == 1

            owned_redis.pause()
            await asyncio.sleep(1.5)  # several ping intervals with no reply
            owned_redis.resume()

            # The hub reconnects, subscribes again and asks for a resync; live
            # messages flow again on the new connection.
            for _ in range(100):
                if hub.reconnects and hub.connected and sub.resync:
                    break
                await asyncio.sleep(0.05)
            assert hub.reconnects >= 1 and hub.connected and sub.resync
            assert "did not answer PING" in caplog.text
            await publisher.publish("c", b"2-1\t2\tmessages\t0\t{}")
            assert (await _next_live(sub, within=5)).seq == 2
    finally:
        await redis.aclose()
        await publisher.aclose()
