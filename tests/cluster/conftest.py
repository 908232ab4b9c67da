"""Fixtures of the cluster tests: one 3-master Redis Cluster for the session.

Each test gets its own key prefix on it (``cluster_settings``); its keys are
deleted from every master afterwards. The cluster is torn down when the
session ends.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from bus.settings import Settings
from tests.support.redis_cluster import OwnedCluster


@pytest.fixture
def cluster_prefix(cluster: OwnedCluster) -> Iterator[str]:
    name = f"lcbus-ctest-{uuid.uuid4().hex[:12]}"
    yield name
    for port in cluster.ports:
        client = redis.Redis(port=port)
        try:
            for key in client.scan_iter(match=f"{name}:*", count=1000):
                client.delete(key)
        except redis.RedisError:
            pass  # a node a test killed and did not restart
        finally:
            client.close()


@pytest.fixture
def cluster_settings(cluster: OwnedCluster, cluster_prefix: str) -> Settings:
    return Settings(redis_url=cluster.url, prefix=cluster_prefix, partitions=8)


@pytest.fixture
def cluster_client(cluster: OwnedCluster) -> Iterator[redis.Redis]:
    client = RedisCluster.from_url(cluster.url)
    yield client  # type: ignore[misc]
    client.close()


@pytest.fixture
async def async_cluster_client(cluster: OwnedCluster) -> AsyncIterator[AsyncRedisCluster]:
    client = AsyncRedisCluster.from_url(cluster.url)
    yield client
    await client.aclose()
