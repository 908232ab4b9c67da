"""The webhook worker as a real arq process, with a real receiver process."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook

from bus.keys import Keys
from bus.settings import Settings
from bus.webhooks.endpoints import Attempt, Endpoints
from tests.support.processes import start_worker, stop
from tests.support.publishing import publish
from tests.support.waiting import wait_until
from tests.support.webhooks import LOOPBACK, Receiver, chain_end, start_receiver

WORKER = "workers.webhooks.WorkerSettings"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from start_receiver()


def worker_env(**extra: str) -> dict[str, str]:
    return {
        "LCBUS_WEBHOOK_ALLOW_NETWORKS": LOOPBACK,
        "LCBUS_WEBHOOK_SCHEDULE": "0,0.5,0.5,0.5",
        "LCBUS_WEBHOOK_JITTER": "0",
        "LCBUS_WEBHOOK_TIMEOUT_S": "1",
        "LCBUS_WEBHOOK_REGISTRY_CACHE_MS": "100",
        **extra,
    }


def shutdown(worker: subprocess.Popen[bytes]) -> None:
    # SIGTERM, and SIGKILL if arq has not exited in time (seen under a full job
    # queue: arq's cancelled poll loop does not always end; see the report).
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        stop(worker, signal.SIGKILL)


def ids(receiver: Receiver, name: str) -> set[str]:
    return {r["headers"]["webhook-id"] for r in receiver.received(name)}


async def test_sigkill_mid_delivery_then_restart_delivers_everything(
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    settings = settings.replace(webhook_allow_networks=LOOPBACK, lease_ttl_ms=1000)
    endpoint = await Endpoints(redis=async_redis, settings=settings).add(
        receiver.url("killed"), events=["chain.*"], max_concurrency=4
    )
    receiver.configure("killed", sleep_s=0.1)
    events = [chain_end(trace=f"trace-{i}") for i in range(60)]
    publish(sync_redis, settings, events)  # type: ignore[arg-type]
    worker = start_worker(settings, tmp_path / "w1.log", target=WORKER, **worker_env())
    try:
        wait_until(lambda: len(ids(receiver, "killed")) >= 10, what="first deliveries")
        stop(worker, signal.SIGKILL)
        assert len(ids(receiver, "killed")) < len(events)
        worker = start_worker(settings, tmp_path / "w2.log", target=WORKER, **worker_env())
        expected = {"msg_" + e.id for e in events}
        wait_until(lambda: ids(receiver, "killed") >= expected, within=90, what="every event")
    finally:
        shutdown(worker)
    secret = endpoint.active_secrets(0)[0]
    for request in receiver.received("killed"):
        Webhook(secret).verify(request["body"], request["headers"])


async def test_a_slow_endpoint_does_not_delay_a_fast_one(
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    settings = settings.replace(webhook_allow_networks=LOOPBACK)
    registry = Endpoints(redis=async_redis, settings=settings)
    await registry.add(receiver.url("slow"), events=["chain.end"], max_concurrency=2)
    await registry.add(receiver.url("fast"), events=["chain.end"])
    receiver.configure("slow", sleep_s=5)
    events = [chain_end(trace=f"trace-{i}") for i in range(20)]
    # Only 4 attempts at a time in this worker: without the slow endpoint's own
    # limit, its attempts would fill every slot for 5 s at a time.
    env = worker_env(LCBUS_WEBHOOK_MAX_JOBS="4", LCBUS_WEBHOOK_TIMEOUT_S="10")
    worker = start_worker(settings, tmp_path / "w.log", target=WORKER, **env)
    try:
        publish(sync_redis, settings, events)  # type: ignore[arg-type]
        wait_until(lambda: len(ids(receiver, "fast")) == 20, what="fast deliveries")
        # Every fast delivery happened while the slow endpoint held at most two
        # rounds of its two slots (each round takes 5 s).
        assert len(receiver.received("slow")) <= 4
    finally:
        shutdown(worker)


async def test_the_worker_posts_through_the_ssrf_guard(
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    # Registered while loopback was allowed; the worker runs without the allow-list,
    # so its guarded transport must refuse the receiver's address at delivery.
    registry = Endpoints(
        redis=async_redis, settings=settings.replace(webhook_allow_networks=LOOPBACK)
    )
    endpoint = await registry.add(receiver.url("guarded"), events=["chain.end"])
    event = chain_end(trace="guarded")
    env = worker_env(LCBUS_WEBHOOK_ALLOW_NETWORKS="", LCBUS_WEBHOOK_SCHEDULE="0")
    worker = start_worker(settings, tmp_path / "w.log", target=WORKER, **env)
    keys = Keys(settings.prefix)
    try:
        publish(sync_redis, settings, [event])  # type: ignore[arg-type]
        wait_until(lambda: sync_redis.xlen(keys.webhook_dlq()) == 1, what="the dead letter")
    finally:
        shutdown(worker)
    assert receiver.received("guarded") == []
    ((_, fields),) = sync_redis.xrange(keys.attempts(endpoint.id))
    attempt = msgspec.json.decode(fields[b"a"], type=Attempt)
    assert (attempt.message_id, attempt.attempt, attempt.outcome, attempt.status) == (
        "msg_" + event.id,
        1,
        "refused",
        None,
    )
    ((_, dead),) = sync_redis.xrange(keys.webhook_dlq())
    assert dead[b"error"].decode() == attempt.error
    assert "loopback" in attempt.error
