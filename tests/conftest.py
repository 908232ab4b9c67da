"""Shared fixtures: a real Redis under a unique key prefix per test.

``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) names the server. Each
test gets its own prefix and deletes only its own keys afterwards, so a shared
server is never flushed. With ``CI=true`` an unreachable Redis fails the run;
otherwise the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from bus.settings import DEFAULT_REDIS_URL, Settings

REDIS_URL = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


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


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    require_redis()
    name = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    try:
        _delete_prefix(client, name)
    finally:
        client.close()


@pytest.fixture
def settings(prefix: str) -> Settings:
    return Settings(redis_url=REDIS_URL, prefix=prefix, partitions=4)


@pytest.fixture
def sync_redis(prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
async def async_redis(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()
