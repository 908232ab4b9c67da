"""Shared fixtures: a real Redis under a unique key prefix per test.

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) names the server. Each
test gets its own prefix and deletes only its own keys afterwards, so a shared
server is never flushed. With ``CI=true`` an unreachable Redis fails the run;
otherwise the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from bus.connect import async_client, is_cluster_client, sync_client
from bus.settings import DEFAULT_REDIS_URL, Settings
from tests.support.redis_cluster import OwnedCluster

REDIS_URL = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
ON_CLUSTER = os.environ.get("LCBUS_TEST_ON_CLUSTER") == "1"


def _redis_unreachable_reason() -> str | None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} is unreachable: {exc}"
    return None


_UNREACHABLE = _redis_unreachable_reason()


def require_redis() -> None:
    if _UNREACHABLE is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {_UNREACHABLE}", pytrace=False)
    pytest.skip(_UNREACHABLE)


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


@pytest.fixture(scope="session")
def cluster() -> Iterator[OwnedCluster]:
    """A 3-master Redis Cluster for the whole session (started on first use)."""
    owned = OwnedCluster()
    try:
        owned.start()
    except (AssertionError, OSError, subprocess.SubprocessError):
        owned = OwnedCluster()  # a port taken between choosing it and binding it
        owned.start()
    yield owned
    owned.stop()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """``REDIS_URL``, or a seed of the session's cluster with ``LCBUS_TEST_ON_CLUSTER=1``
    (which runs the tests that use these fixtures on Redis Cluster)."""
    if ON_CLUSTER:
        owned: OwnedCluster = request.getfixturevalue("cluster")
        return owned.url
    require_redis()
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    yield name
    # On the cluster run, arq's queue keys sit on the standalone Redis.
    for url in {redis_url, REDIS_URL} if ON_CLUSTER else {redis_url}:
        client = sync_client(Settings(redis_url=url))
        try:
            if is_cluster_client(client):
                for key in list(client.scan_iter(match=f"{name}:*", count=1000)):
                    client.delete(key)
            else:
                _delete_prefix(client, name)
        finally:
            client.close()


@pytest.fixture
def settings(prefix: str, redis_url: str) -> Settings:
    # On the cluster arq's queue goes to the standalone Redis, as in a deployment.
    queue = REDIS_URL if ON_CLUSTER else ""
    return Settings(redis_url=redis_url, queue_redis_url=queue, prefix=prefix, partitions=4)


@pytest.fixture
def sync_redis(settings: Settings) -> Iterator[redis.Redis]:
    client = sync_client(settings)
    yield client
    client.close()


@pytest.fixture
async def async_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = async_client(settings)
    yield client
    await client.aclose()
