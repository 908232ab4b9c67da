"""Streaming frontends on a Redis Cluster: live events on sharded pub/sub, one hub
connection per master, and no gap or duplicate when a trace's slot moves mid-stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from bus.history import Topic
from bus.keys import Keys, key_slot
from bus.tokens import stream_token
from tests.processes.test_frontend_stream import EXPECTED, TOKENS, _assert_complete
from tests.support.frontend import SECRET, Frontend, append, collect, conversation, frontend
from tests.support.redis_cluster import OwnedCluster
from tests.support.waiting import wait_until_async

TRACES = 6


@pytest.fixture
def frontends(cluster: OwnedCluster, cluster_prefix: str) -> Iterator[list[Frontend]]:
    env = {"LCBUS_PING_INTERVAL_S": "1"}
    with (
        frontend(cluster.url, cluster_prefix, **env) as a,
        frontend(cluster.url, cluster_prefix, **env) as b,
    ):
        yield [a, b]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
        yield client


def trace_url(server: Frontend, trace_id: str) -> str:
    token = stream_token(trace_id, secret=SECRET)
    return f"{server.url}/traces/{trace_id}/stream?token={token}"


async def test_clients_get_every_event_once_while_a_trace_slot_moves(
    cluster: OwnedCluster,
    cluster_prefix: str,
    frontends: list[Frontend],
    async_cluster_client: AsyncRedisCluster,
    http: httpx.AsyncClient,
) -> None:
    redis: object = async_cluster_client
    traces = [f"t-{uuid.uuid4().hex}" for _ in range(TRACES)]
    keys = Keys(cluster_prefix)
    owners = {cluster.owner_port(key_slot(keys.channel(t))) for t in traces}
    assert len(owners) > 1, "the traces' channels should span several masters"
    events = conversation(TOKENS)
    started = [asyncio.Event() for _ in range(2 * TRACES)]
    clients = [
        asyncio.create_task(
            collect(http, "GET", trace_url(frontends[i % 2], traces[i // 2]), started=started[i])
        )
        for i in range(2 * TRACES)
    ]
    await asyncio.gather(*(event.wait() for event in started))
    await asyncio.gather(
        *(append(redis, cluster_prefix, [Topic("trace", t)], events[:40]) for t in traces)  # type: ignore[arg-type]
    )
    moved = traces[0]
    slot = key_slot(keys.history(moved))
    source = cluster.owner_port(slot)
    target = next(port for port in cluster.ports if port != source)

    def append_while_migrating() -> None:
        # The history already left the source: the script is sent on with ASK.
        asyncio.run_coroutine_threadsafe(
            append(redis, cluster_prefix, [Topic("trace", moved)], events[40:60]),
            loop,  # type: ignore[arg-type]
        ).result(timeout=30)

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(cluster.move_slot, slot, target, while_migrating=append_while_migrating)
    assert cluster.owner_port(slot) == target
    rest = [append(redis, cluster_prefix, [Topic("trace", moved)], events[60:])]
    rest += [append(redis, cluster_prefix, [Topic("trace", t)], events[40:]) for t in traces[1:]]  # type: ignore[arg-type]
    await asyncio.gather(*rest)  # type: ignore[arg-type]

    for got in await asyncio.gather(*clients):
        _assert_complete(got, len(events))
        assert got.ended and got.text() == EXPECTED
    health = [server.health() for server in frontends]
    assert all(h["pubsub"] for h in health)
    # Each frontend moved the trace's subscription to the slot's new owner.
    assert all(h["pubsub_reconnects"] >= 1 for h in health)
    await asyncio.to_thread(cluster.move_slot, slot, source)


async def test_a_client_of_an_unserved_slot_waits_then_gets_every_event_once(
    cluster: OwnedCluster,
    cluster_prefix: str,
    frontends: list[Frontend],
    async_cluster_client: AsyncRedisCluster,
    http: httpx.AsyncClient,
) -> None:
    """No node serves the channel's slot when the client arrives (a master lost, its
    slots not taken over): the stream waits, as through a standalone outage, and
    once the slot is served again it carries the whole trace."""
    trace = f"t-{uuid.uuid4().hex}"
    slot = key_slot(Keys(cluster_prefix).channel(trace))
    owner = cluster.unassign(slot)
    try:
        started = asyncio.Event()
        client = asyncio.create_task(
            collect(http, "GET", trace_url(frontends[0], trace), started=started)
        )
        await started.wait()

        async def waiting() -> bool:
            health = await asyncio.to_thread(frontends[0].health)
            return client.done() or health["channels"] == 1

        await wait_until_async(waiting, within=30, what="the frontend holding the channel")
        assert not client.done(), "the stream ended while its slot was unserved"
    finally:
        await asyncio.to_thread(cluster.assign, slot, owner)
    events = conversation(TOKENS)
    redis: object = async_cluster_client
    await append(redis, cluster_prefix, [Topic("trace", trace)], events)  # type: ignore[arg-type]
    got = await asyncio.wait_for(client, timeout=60)
    _assert_complete(got, len(events))
    assert got.ended and got.text() == EXPECTED
