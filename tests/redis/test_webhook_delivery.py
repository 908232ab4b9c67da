"""Delivery through the router and the attempt job, with an in-process arq worker
and a real receiver process."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from standardwebhooks.webhooks import Webhook

from bus.events import BaseEvent, ChatModelStart, WebhookEndpointDisabled, decode, new_event_id
from bus.keys import ENTRY_FIELD, Keys
from bus.runtime.arqpool import arq_pool as make_arq_pool
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from bus.webhooks.endpoints import Endpoint, Endpoints
from bus.webhooks.outbox import (
    JOB_FUNCTION,
    WORKER,
    AttemptJob,
    dead_letters,
    enqueue_attempts,
    job_id,
    replay,
    replay_since,
)
from bus.webhooks.router import Router
from tests.support.webhooks import (
    Receiver,
    chain_end,
    custom,
    run_jobs,
    start_receiver,
    token,
    tool_end,
    webhook_settings,
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from start_receiver()


@pytest.fixture
def wh_settings(settings: Settings) -> Settings:
    return webhook_settings(settings, webhook_registry_cache_ms=0)


@pytest.fixture
async def arq_pool(wh_settings: Settings) -> AsyncIterator[ArqRedis]:
    pool = make_arq_pool(wh_settings)
    yield pool
    await pool.aclose()


class Setup:
    def __init__(self, settings: Settings, redis: aioredis.Redis, arq: ArqRedis, rx: Receiver):
        self.settings = settings
        self.redis = redis
        self.registry = Endpoints(redis=redis, settings=settings)
        self.router = Router(redis=redis, arq=arq, settings=settings)
        self.rx = rx

    async def endpoint(self, **options: Any) -> tuple[Endpoint, str]:
        name = uuid.uuid4().hex[:10]
        behaviour = options.pop("behaviour", {})
        if behaviour:
            self.rx.configure(name, **behaviour)
        return await self.registry.add(self.rx.url(name), **options), name

    async def send(self, *events: BaseEvent) -> None:
        await self.router([Delivery(entry_id="0-1", partition=0, event=e) for e in events])

    async def run(self) -> None:
        await run_jobs(self.settings, self.redis)


@pytest.fixture
def setup(
    wh_settings: Settings, async_redis: aioredis.Redis, arq_pool: ArqRedis, receiver: Receiver
) -> Setup:
    return Setup(wh_settings, async_redis, arq_pool, receiver)


def verified(endpoint: Endpoint, request: dict[str, Any]) -> Any:
    secret = endpoint.active_secrets(time.time())[0]
    return Webhook(secret).verify(request["body"], request["headers"])


async def test_filters_route_each_event_only_where_it_belongs(setup: Setup) -> None:
    ends, ends_rx = await setup.endpoint(events=["chain.end"])
    everything, everything_rx = await setup.endpoint(events=["*"])
    tokens, tokens_rx = await setup.endpoint(events=["llm.new_token"])
    reports, reports_rx = await setup.endpoint(events=["custom.report.*"], tags=["prod"])
    prod_report = custom("report.ready")
    prod_report.tags = ["prod"]
    events = [chain_end(), tool_end(), token(), prod_report, custom("report.ready")]
    await setup.send(*events)
    await setup.run()

    def types(endpoint: Endpoint, name: str) -> list[str]:
        return sorted(verified(endpoint, r)["type"] for r in setup.rx.received(name))

    assert types(ends, ends_rx) == ["chain.end"]
    assert types(everything, everything_rx) == [
        "chain.end",
        "custom.report.ready",
        "custom.report.ready",
        "tool.end",
    ]
    assert types(tokens, tokens_rx) == ["llm.new_token"]
    assert types(reports, reports_rx) == ["custom.report.ready"]
    (request,) = setup.rx.received(ends_rx)
    body = json.loads(request["body"])
    assert set(body) == {"type", "timestamp", "data"}
    assert body["data"]["id"] == events[0].id
    assert request["headers"]["webhook-id"] == "msg_" + events[0].id

    # The same batch handed over again (at-least-once consumption) queues nothing.
    await setup.send(*events)
    assert setup.router.duplicates == 7
    await setup.run()
    assert len(setup.rx.received(everything_rx)) == 4


async def test_500_500_200_is_three_attempts_with_one_webhook_id(setup: Setup) -> None:
    endpoint, name = await setup.endpoint(behaviour={"statuses": [500, 500, 200]})
    await setup.send(chain_end())
    await setup.run()
    got = setup.rx.received(name)
    assert len(got) == 3
    assert len({r["headers"]["webhook-id"] for r in got}) == 1
    for request in got:
        verified(endpoint, request)
    attempts = await setup.registry.attempts(endpoint.id)
    assert [(a.attempt, a.status, a.outcome) for a in reversed(attempts)] == [
        (1, 500, "failure"),
        (2, 500, "failure"),
        (3, 200, "success"),
    ]
    assert attempts[-1].response == "status 500"
    after = await setup.registry.get(endpoint.id)
    assert after.failing_since is None and after.last_success_at is not None
    assert await dead_letters(setup.redis, setup.settings) == []


async def disabled_events(setup: Setup) -> list[WebhookEndpointDisabled]:
    keys = Keys(setup.settings.prefix, setup.settings.partitions)
    found = []
    for partition in range(setup.settings.partitions):
        for _, fields in await setup.redis.xrange(keys.events(partition)):
            event = decode(fields[ENTRY_FIELD])
            if isinstance(event, WebhookEndpointDisabled):
                found.append(event)
    return found


async def test_410_disables_the_endpoint(setup: Setup) -> None:
    endpoint, name = await setup.endpoint(behaviour={"statuses": [410]})
    await setup.send(chain_end())
    await setup.run()
    assert len(setup.rx.received(name)) == 1
    after = await setup.registry.get(endpoint.id)
    assert not after.enabled and "410" in after.disabled_reason
    (event,) = await disabled_events(setup)
    assert event.endpoint_id == endpoint.id and "410" in event.reason
    (dead,) = await dead_letters(setup.redis, setup.settings)
    assert dead.endpoint_id == endpoint.id and dead.error == "410 Gone"
    # Later events are not sent to it.
    await setup.send(chain_end())
    await setup.run()
    assert len(setup.rx.received(name)) == 1


async def test_hanging_receiver_times_out(setup: Setup) -> None:
    setup.settings = setup.settings.replace(webhook_timeout_s=0.5, webhook_schedule="0")
    endpoint, _name = await setup.endpoint(behaviour={"sleep_s": 3})
    await setup.send(chain_end())
    await setup.run()
    (attempt,) = await setup.registry.attempts(endpoint.id)
    assert attempt.outcome == "failure" and attempt.status is None
    assert "timed out" in attempt.error
    (dead,) = await dead_letters(setup.redis, setup.settings)
    assert "timed out" in dead.error and dead.attempts == 1


async def test_retry_after_is_honoured(setup: Setup) -> None:
    setup.settings = setup.settings.replace(webhook_schedule="0,0")
    endpoint, name = await setup.endpoint(behaviour={"statuses": [429, 200], "retry_after": "1"})
    await setup.send(chain_end())
    await setup.run()
    first, second = setup.rx.received(name)
    assert second["at"] - first["at"] >= 1.0
    assert (await setup.registry.attempts(endpoint.id))[0].outcome == "success"


async def test_endpoint_failing_too_long_is_disabled(setup: Setup) -> None:
    setup.settings = setup.settings.replace(webhook_disable_after_s=0)
    endpoint, _name = await setup.endpoint(behaviour={"statuses": [500]})
    await setup.send(chain_end())
    await setup.run()
    after = await setup.registry.get(endpoint.id)
    assert not after.enabled and "without a success" in after.disabled_reason
    assert [e.endpoint_id for e in await disabled_events(setup)] == [endpoint.id]


async def test_dead_letters_replay_with_the_same_webhook_id(
    setup: Setup, arq_pool: ArqRedis
) -> None:
    setup.settings = setup.settings.replace(webhook_schedule="0,0.1")
    _endpoint, name = await setup.endpoint(behaviour={"statuses": [500, 500, 500, 500, 200]})
    first, second = chain_end(), chain_end()
    await setup.send(first, second)
    await setup.run()
    dead = await dead_letters(setup.redis, setup.settings)
    assert sorted(d.message_id for d in dead) == sorted(["msg_" + first.id, "msg_" + second.id])
    assert await replay(setup.redis, arq_pool, setup.settings, "msg_" + first.id) == 1
    assert await replay_since(setup.redis, arq_pool, setup.settings, time.time() - 60) == 1
    await setup.run()
    got = setup.rx.received(name)
    ids = [r["headers"]["webhook-id"] for r in got]
    assert sorted(ids) == sorted(["msg_" + first.id, "msg_" + second.id] * 3)
    assert [r["headers"]["webhook-id"] for r in got[4:]].count("msg_" + first.id) == 1
    assert await dead_letters(setup.redis, setup.settings) == []


async def test_delivery_refuses_an_address_the_guard_refuses(setup: Setup) -> None:
    endpoint, name = await setup.endpoint()
    # The worker runs without the loopback allow-list the registration had.
    setup.settings = setup.settings.replace(webhook_allow_networks="", webhook_schedule="0")
    await setup.send(chain_end())
    await setup.run()
    assert setup.rx.received(name) == []
    (attempt,) = await setup.registry.attempts(endpoint.id)
    assert attempt.outcome == "refused" and "loopback" in attempt.error


async def test_max_concurrency_holds_deliveries_back(setup: Setup) -> None:
    endpoint, name = await setup.endpoint(max_concurrency=1, behaviour={"sleep_s": 0.3})
    await setup.send(chain_end(), chain_end(), chain_end())
    await setup.run()
    got = setup.rx.received(name)
    assert len(got) == 3
    starts = sorted(r["at"] for r in got)
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(starts))
    assert all(a.outcome == "success" for a in await setup.registry.attempts(endpoint.id))


async def test_an_attempt_job_is_refused_while_its_job_or_result_exists(
    wh_settings: Settings, async_redis: aioredis.Redis, arq_pool: ArqRedis
) -> None:
    job = AttemptJob("ep_x", "msg_1", 1)
    assert await enqueue_attempts(arq_pool, wh_settings, [job, job]) == [True, False]
    queue = Keys(wh_settings.prefix, wh_settings.partitions).arq_queue(WORKER)
    (queued,) = await arq_pool.queued_jobs(queue_name=queue)
    assert (queued.function, queued.args) == (JOB_FUNCTION, ("ep_x", "msg_1", 1, 0, ""))
    jid = job_id("ep_x", "msg_1", 1)
    # What arq leaves once the job has run: no job key, a result key.
    keys = Keys(wh_settings.prefix, wh_settings.partitions)
    await async_redis.delete(keys.arq(job_key_prefix + jid))
    await async_redis.zrem(queue, jid)
    await async_redis.set(keys.arq(result_key_prefix + jid), b"r", px=60_000)
    assert await enqueue_attempts(arq_pool, wh_settings, [job]) == [False]
    assert await async_redis.zcard(queue) == 0


async def test_arq_keeps_every_key_of_its_jobs_under_the_prefix(
    setup: Setup, async_redis: aioredis.Redis
) -> None:
    endpoint, _name = await setup.endpoint(behaviour={"statuses": [500, 200]})
    event = chain_end()
    await setup.send(event)
    await setup.run()
    # Every job id names the endpoint, so this finds whatever arq wrote for them.
    found = sorted([k.decode() async for k in async_redis.scan_iter(match=f"*{endpoint.id}*")])
    keys = Keys(setup.settings.prefix, setup.settings.partitions)
    first, second = (job_id(endpoint.id, "msg_" + event.id, n) for n in (1, 2))
    assert found == sorted(
        [
            f"{setup.settings.prefix}:arq:result:{first}",
            f"{setup.settings.prefix}:arq:result:{second}",
            keys.attempts(endpoint.id),
            keys.endpoint(endpoint.id),
        ]
    )


async def test_an_attempt_httpx_refuses_is_a_logged_failure_retried_then_dead(
    setup: Setup,
) -> None:
    """An endpoint stored before registration checked URLs as httpx does: its attempts fail
    (the sender sends only the form registration checks, and this URL has none), and
    each one is logged, retried, then dead-lettered."""
    setup.settings = setup.settings.replace(webhook_schedule="0,0.1")
    endpoint, _name = await setup.endpoint()
    bad_url = "http://\uff11\uff12\uff17.0.0.1:9/hook"
    await setup.registry.update(endpoint.id, url=bad_url)
    event = chain_end()
    await setup.send(event)
    await setup.run()
    attempts = await setup.registry.attempts(endpoint.id)
    assert [(a.attempt, a.outcome, a.status) for a in attempts] == [
        (2, "failure", None),
        (1, "failure", None),
    ]
    refused = "WebhookError: webhook URL 'http://\uff11\uff12\uff17.0.0.1:9/hook' cannot be sent"
    assert all(a.error.startswith(refused) for a in attempts)
    assert all("Invalid IDNA hostname" in a.error for a in attempts)
    (dead,) = await dead_letters(setup.redis, setup.settings)
    assert dead.message_id == "msg_" + event.id and dead.attempts == 2
    assert dead.error.startswith(refused)


async def test_token_webhooks_filtered_on_tags_match_the_runs_start(
    setup: Setup, wh_settings: Settings, async_redis: aioredis.Redis, arq_pool: ArqRedis
) -> None:
    """Token events do not repeat their run's tags: a tag filter matches them through
    the run's start, also on a replica that did not see that start."""
    _endpoint, name = await setup.endpoint(events=["llm.new_token"], tags=["prod"])

    def start(run: str, tags: list[str]) -> ChatModelStart:
        return ChatModelStart(
            id=new_event_id(), time=time.time(), run_id=run, trace_id=run, seq=1, tags=tags
        )

    prod, dev = [token("run-prod") for _ in range(3)], token("run-dev")
    await setup.send(start("run-prod", ["prod"]), prod[0], start("run-dev", ["dev"]), dev)
    # The partition moves to another replica mid-run: it never saw the run start.
    other = Router(redis=async_redis, arq=arq_pool, settings=wh_settings)
    await other([Delivery(entry_id="0-2", partition=0, event=e) for e in prod[1:]])
    await setup.run()
    got = sorted(r["headers"]["webhook-id"] for r in setup.rx.received(name))
    assert got == sorted("msg_" + e.id for e in prod)


async def test_a_registry_change_reaches_a_router_with_a_cached_list_at_once(
    wh_settings: Settings, async_redis: aioredis.Redis, arq_pool: ArqRedis, receiver: Receiver
) -> None:
    # A cache that would otherwise hold the list for an hour.
    settings = wh_settings.replace(webhook_registry_cache_ms=3_600_000)
    setup = Setup(settings, async_redis, arq_pool, receiver)
    await setup.send(chain_end())  # caches a registry without the endpoint below
    endpoint, name = await setup.endpoint(events=["chain.end"])
    first = chain_end()
    await setup.send(first)  # right after the endpoint was added
    await setup.run()
    assert [r["headers"]["webhook-id"] for r in receiver.received(name)] == ["msg_" + first.id]

    await setup.registry.update(endpoint.id, events=["tool.end"])
    await setup.send(chain_end(), tool_end())  # the new filter applies to this batch
    await setup.run()
    types = [verified(endpoint, r)["type"] for r in receiver.received(name)]
    assert types == ["chain.end", "tool.end"]
