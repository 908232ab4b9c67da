from __future__ import annotations

import base64
import time

import pytest
import redis.asyncio as aioredis

from bus.errors import EndpointNotFound, UnsafeURLError, WebhookError
from bus.settings import Settings
from bus.webhooks.endpoints import Endpoints, validate_secret
from tests.support.webhooks import chain_end, tool_end, webhook_settings


@pytest.fixture
def registry(settings: Settings, async_redis: aioredis.Redis) -> Endpoints:
    return Endpoints(redis=async_redis, settings=webhook_settings(settings))


async def test_add_get_list_remove(registry: Endpoints) -> None:
    first = await registry.add("http://127.0.0.1:9/a", events=["chain.*"], description="one")
    second = await registry.add("http://localhost:9/b", rate_limit=5, max_concurrency=2)
    assert first.id != second.id
    got = await registry.get(first.id)
    assert got == first
    assert got.events == ["chain.*"] and got.enabled and got.created_at > 0
    assert [e.id for e in await registry.all()] == [first.id, second.id]
    await registry.remove(first.id)
    with pytest.raises(EndpointNotFound):
        await registry.get(first.id)
    with pytest.raises(EndpointNotFound):
        await registry.remove(first.id)
    assert [e.id for e in await registry.all()] == [second.id]


async def test_generated_secret_format(registry: Endpoints) -> None:
    endpoint = await registry.add("http://127.0.0.1:9/a")
    (secret,) = endpoint.active_secrets(time.time())
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24


async def test_bad_input_is_refused_with_clear_errors(registry: Endpoints) -> None:
    with pytest.raises(UnsafeURLError):
        await registry.add("http://10.0.0.1/")
    with pytest.raises(WebhookError, match="bad event filter"):
        await registry.add("http://127.0.0.1:9/", events=["llm*"])
    with pytest.raises(WebhookError, match="base64"):
        await registry.add("http://127.0.0.1:9/", secret="whsec_not base64!")
    with pytest.raises(WebhookError, match="16 to 64 bytes"):
        validate_secret("whsec_" + base64.b64encode(b"short").decode())
    with pytest.raises(WebhookError, match="max_concurrency"):
        await registry.add("http://127.0.0.1:9/", max_concurrency=0)
    assert await registry.all() == []


async def test_url_refused_without_allow_list(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    strict = Endpoints(redis=async_redis, settings=settings)
    with pytest.raises(UnsafeURLError, match="loopback"):
        await strict.add("http://localhost:8000/hook")


async def test_enable_disable(registry: Endpoints) -> None:
    endpoint = await registry.add("http://127.0.0.1:9/a")
    assert await registry.disable(endpoint.id, "maintenance") is True
    assert await registry.disable(endpoint.id, "again") is False
    got = await registry.get(endpoint.id)
    assert not got.enabled and got.disabled_reason == "maintenance" and got.disabled_at
    await registry.update(endpoint.id, failing_since=123.0)
    await registry.enable(endpoint.id)
    got = await registry.get(endpoint.id)
    assert got.enabled and got.disabled_reason == "" and got.failing_since is None
    with pytest.raises(EndpointNotFound):
        await registry.disable("ep_missing")
    with pytest.raises(EndpointNotFound):
        await registry.enable("ep_missing")


async def test_update_only_unset_keeps_the_first_value(registry: Endpoints) -> None:
    endpoint = await registry.add("http://127.0.0.1:9/a")
    assert await registry.update(endpoint.id, only_unset=True, failing_since=1.0) is True
    assert await registry.update(endpoint.id, only_unset=True, failing_since=2.0) is False
    assert (await registry.get(endpoint.id)).failing_since == 1.0


async def test_rotation_keeps_old_secret_for_the_grace_period(registry: Endpoints) -> None:
    endpoint = await registry.add("http://127.0.0.1:9/a")
    (old,) = endpoint.active_secrets(time.time())
    rotated = await registry.rotate_secret(endpoint.id, grace_s=60)
    now = time.time()
    active = rotated.active_secrets(now)
    assert len(active) == 2 and active[0] == old
    assert rotated.active_secrets(now + 120) == active[1:]
    # A second rotation drops what has expired and never extends a grace period.
    again = await registry.rotate_secret(endpoint.id, grace_s=0)
    assert again.active_secrets(time.time() + 0.001) == [again.secrets[-1].value]
    with pytest.raises(EndpointNotFound):
        await registry.rotate_secret("ep_missing")


async def test_filters_on_types_tags_and_metadata(registry: Endpoints) -> None:
    endpoint = await registry.add(
        "http://127.0.0.1:9/a",
        events=["chain.end"],
        tags=["prod", "beta"],
        metadata={"tenant": "acme", "tier": "3"},
    )
    good = chain_end(tags=["beta"], metadata={"tenant": "acme", "tier": 3, "x": 1})
    assert endpoint.wants(good, "chain.end")
    assert not endpoint.wants(tool_end(tags=["beta"], metadata=good.metadata), "tool.end")
    assert not endpoint.wants(chain_end(tags=["dev"], metadata=good.metadata), "chain.end")
    assert not endpoint.wants(chain_end(tags=["prod"], metadata={"tenant": "acme"}), "chain.end")
    assert not endpoint.wants(
        chain_end(tags=["prod"], metadata={"tenant": "other", "tier": "3"}), "chain.end"
    )
