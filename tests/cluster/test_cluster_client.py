"""The bus's asyncio cluster client when one slot is unserved: the other masters'
commands in flight are not cut (``bus.connect.ContainedCluster``)."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ClusterDownError, SlotNotCoveredError

from bus.connect import async_client
from bus.keys import key_slot
from bus.settings import Settings
from tests.support.redis_cluster import OwnedCluster


def _key_elsewhere(prefix: str, cluster: OwnedCluster, port: int, other_than: int) -> str:
    """A key of ``prefix`` in a slot other than ``other_than`` that ``port`` does not serve."""
    for n in range(10_000):
        key = f"{prefix}:k{n}"
        slot = key_slot(key)
        if slot != other_than and cluster.owner_port(slot) != port:
            return key
    raise AssertionError("no such key")


async def test_a_clusterdown_reply_does_not_cut_a_read_in_flight_elsewhere(
    cluster: OwnedCluster, cluster_settings: Settings, cluster_prefix: str
) -> None:
    lost_key = f"{cluster_prefix}:lost"
    lost_slot = key_slot(lost_key)
    owner = cluster.owner_port(lost_slot)
    stream = _key_elsewhere(cluster_prefix, cluster, owner, lost_slot)
    client = async_client(cluster_settings.replace(redis_cluster="true"))
    try:
        await client.xadd(stream, {"n": "0"})
        await client.get(lost_key)  # every node known, connections open
        cluster.unassign(lost_slot)
        try:
            # A blocking read on a healthy master, in flight while another task
            # meets the unserved slot.
            read = asyncio.create_task(
                client.xread({stream: "$"}, block=3000, count=1)  # type: ignore[dict-item]
            )
            await asyncio.sleep(0.3)
            with pytest.raises(ClusterDownError):
                await client.get(lost_key)  # redis-py used to close every connection here
            # The slot map refreshed, without the slot.
            with pytest.raises(SlotNotCoveredError):
                await client.get(lost_key)
            await client.xadd(stream, {"n": "1"})
            reply = await asyncio.wait_for(read, timeout=5)
            assert reply and reply[0][1][0][1] == {b"n": b"1"}
        finally:
            await asyncio.to_thread(cluster.assign, lost_slot, owner)
        assert await client.get(lost_key) is None  # served again, the client follows
    finally:
        await client.aclose()
