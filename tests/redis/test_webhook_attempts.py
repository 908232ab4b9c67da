"""The attempt job's decisions, in process: the receiver is a loopback HTTP server
answering from a script, the Deliverer posts to it through its real (guarded) client,
the state is in the real Redis, and each queued attempt is taken off arq's queue and
run by hand, so the schedule is read exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import deserialize_job_raw
from standardwebhooks.webhooks import Webhook

from bus.connect import queue_client
from bus.events import WebhookEndpointDisabled, decode
from bus.keys import ENTRY_FIELD, Keys
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from bus.webhooks.delivery import Deliverer, Outcome
from bus.webhooks.endpoints import Endpoint, Endpoints
from bus.webhooks.outbox import JOB_FUNCTION, WORKER, AttemptJob, dead_letters
from bus.webhooks.router import Router
from tests.support.webhooks import chain_end, webhook_settings


@dataclass(frozen=True)
class Answer:
    status: int
    text: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


DROP = "drop"
"""A scripted answer: the receiver closes the connection without answering."""


@dataclass(frozen=True)
class Recorded:
    """One request as the receiver got it (header names in lower case)."""

    method: str
    url: str
    headers: dict[str, str]
    content: bytes


class ScriptedReceiver:
    """A loopback HTTP server answering ``POST /hook`` from a list, in order; records every
    request."""

    def __init__(self) -> None:
        self.answers: list[Answer | str] = []
        self.requests: list[Recorded] = []
        self.url = ""
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hook"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(
            Recorded(request.method, str(request.url), headers, await request.read())
        )
        answer = self.answers.pop(0)
        if not isinstance(answer, Answer):
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        await asyncio.sleep(answer.delay_s)
        return web.Response(status=answer.status, text=answer.text, headers=answer.headers)


@dataclass
class Queued:
    job: AttemptJob
    defer_ms: int


class Rig:
    def __init__(self, settings: Settings, redis: aioredis.Redis, arq: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self.arq = arq
        self.keys = Keys(settings.prefix, settings.partitions)
        self.registry = Endpoints(redis=redis, settings=settings)
        self.receiver = ScriptedReceiver()

    @property
    def url(self) -> str:
        return self.receiver.url

    def deliverer(self) -> Deliverer:
        return Deliverer(redis=self.redis, arq=self.arq, settings=self.settings)

    async def route_one(self, endpoint: Endpoint) -> str:
        """Route one chain end to ``endpoint``; the message id."""
        event = chain_end()
        router = Router(redis=self.redis, arq=self.arq, settings=self.settings)
        await router([Delivery(entry_id="0-1", partition=0, event=event)])
        return "msg_" + event.id

    async def queued(self) -> list[Queued]:
        """Every queued attempt with its defer, taken off the queue (as a worker would).

        Through the arq client: the queue may live on a Redis of its own."""
        queue = self.keys.arq_queue(WORKER)
        found = []
        for raw_id, score in await self.redis.zrange(queue, 0, -1, withscores=True):
            job_key = self.keys.arq(job_key_prefix + raw_id.decode())
            payload = await self.redis.get(job_key)
            function, args, kwargs, _, enqueued_ms = deserialize_job_raw(
                payload, deserializer=self.arq.job_deserializer
            )
            assert (function, kwargs) == (JOB_FUNCTION, {})
            found.append(Queued(AttemptJob(*args), int(score) - enqueued_ms))
            await self.arq.delete(job_key)
            await self.arq.zrem(queue, raw_id)
        return found

    async def log(self, endpoint: Endpoint) -> list[tuple[int, int | None, str, str, str]]:
        attempts = reversed(await self.registry.attempts(endpoint.id))
        return [(a.attempt, a.status, a.outcome, a.response, a.error) for a in attempts]

    async def disabled_events(self) -> list[WebhookEndpointDisabled]:
        found = []
        for partition in range(self.settings.partitions):
            for _, fields in await self.redis.xrange(self.keys.events(partition)):
                event = decode(fields[ENTRY_FIELD])
                if isinstance(event, WebhookEndpointDisabled):
                    found.append(event)
        return found


@pytest.fixture
async def rig(settings: Settings, async_redis: aioredis.Redis) -> AsyncIterator[Rig]:
    wh = webhook_settings(settings, webhook_schedule="0,5,30", webhook_registry_cache_ms=0)
    arq = queue_client(wh)
    rig = Rig(wh, async_redis, arq)
    await rig.receiver.start()
    yield rig
    await rig.receiver.stop()
    await arq.aclose()


def answer(status: int, text: str = "", **headers: str) -> Answer:
    return Answer(status, text, headers)


async def run_schedule(rig: Rig, endpoint: Endpoint) -> tuple[list[Outcome], list[Queued]]:
    """Run every attempt the queue gets until it is empty: outcomes, and what was queued."""
    outcomes: list[Outcome] = []
    seen: list[Queued] = []
    async with rig.deliverer() as deliverer:
        while queued := await rig.queued():
            (item,) = queued
            seen.append(item)
            outcomes.append(await deliverer.attempt(item.job))
    return outcomes, seen


async def test_failures_follow_the_schedule_then_dead_letter(rig: Rig) -> None:
    endpoint = await rig.registry.add(rig.url, events=["chain.end"])
    rig.receiver.answers = [answer(500, "boom 1"), answer(500, "boom 2"), answer(500, "boom 3")]
    msg_id = await rig.route_one(endpoint)

    outcomes, queued = await run_schedule(rig, endpoint)

    assert outcomes == [Outcome.RETRYING, Outcome.RETRYING, Outcome.DEAD]
    assert [(q.job, q.defer_ms) for q in queued] == [
        (AttemptJob(endpoint.id, msg_id, 1), 0),
        (AttemptJob(endpoint.id, msg_id, 2), 5_000),
        (AttemptJob(endpoint.id, msg_id, 3), 30_000),
    ]
    assert await rig.log(endpoint) == [
        (1, 500, "failure", "boom 1", ""),
        (2, 500, "failure", "boom 2", ""),
        (3, 500, "failure", "boom 3", ""),
    ]
    body = await rig.redis.get(rig.keys.webhook_message(msg_id))
    (dead,) = await dead_letters(rig.redis, rig.settings)
    assert (dead.endpoint_id, dead.message_id, dead.type, dead.attempts, dead.error) == (
        endpoint.id,
        msg_id,
        "chain.end",
        3,
        "HTTP 500",
    )
    assert dead.body == body
    # Every attempt is the same signed message: one webhook-id, the stored body.
    secret = endpoint.active_secrets(time.time())[0]
    for request in rig.receiver.requests:
        assert (request.method, str(request.url)) == ("POST", rig.url)
        assert request.headers["webhook-id"] == msg_id
        assert request.content == body
        Webhook(secret).verify(request.content, dict(request.headers))
    assert len(rig.receiver.requests) == 3
    after = await rig.registry.get(endpoint.id)
    assert after.enabled and after.failing_since is not None and after.last_success_at is None


async def test_a_success_ends_the_failure_streak(rig: Rig) -> None:
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [DROP, answer(204)]
    msg_id = await rig.route_one(endpoint)

    outcomes, queued = await run_schedule(rig, endpoint)

    assert outcomes == [Outcome.RETRYING, Outcome.DELIVERED]
    assert [(q.job.attempt, q.defer_ms) for q in queued] == [(1, 0), (2, 5_000)]
    assert {q.job.msg_id for q in queued} == {msg_id}
    assert await rig.log(endpoint) == [
        (1, None, "failure", "", "ServerDisconnectedError: Server disconnected"),
        (2, 204, "success", "", ""),
    ]
    after = await rig.registry.get(endpoint.id)
    assert after.failing_since is None and after.last_success_at is not None
    assert await dead_letters(rig.redis, rig.settings) == []


async def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt_retried(rig: Rig) -> None:
    rig.settings = rig.settings.replace(webhook_timeout_s=0.3)
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [Answer(200, "too late", delay_s=2.0), answer(200, "ok")]
    msg_id = await rig.route_one(endpoint)

    outcomes, queued = await run_schedule(rig, endpoint)

    assert outcomes == [Outcome.RETRYING, Outcome.DELIVERED]
    assert [(q.job, q.defer_ms) for q in queued] == [
        (AttemptJob(endpoint.id, msg_id, 1), 0),
        (AttemptJob(endpoint.id, msg_id, 2), 5_000),
    ]
    assert await rig.log(endpoint) == [
        (1, None, "failure", "", "timed out after 0.3 s"),
        (2, 200, "success", "ok", ""),
    ]


async def test_410_disables_the_endpoint_and_dead_letters_what_waits(rig: Rig) -> None:
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [answer(410, "gone for good")]
    msg_id = await rig.route_one(endpoint)

    outcomes, queued = await run_schedule(rig, endpoint)

    assert outcomes == [Outcome.RECEIVER_GONE]
    assert [q.job for q in queued] == [AttemptJob(endpoint.id, msg_id, 1)]
    assert await rig.log(endpoint) == [(1, 410, "failure", "gone for good", "")]
    after = await rig.registry.get(endpoint.id)
    assert (after.enabled, after.disabled_reason) == (False, "the endpoint answered 410 Gone")
    (event,) = await rig.disabled_events()
    assert (event.endpoint_id, event.url, event.reason) == (
        endpoint.id,
        rig.url,
        "the endpoint answered 410 Gone",
    )
    # An attempt that was already queued when the endpoint got disabled sends nothing.
    async with rig.deliverer() as deliverer:
        assert await deliverer.attempt(AttemptJob(endpoint.id, msg_id, 2)) == (
            Outcome.ENDPOINT_DISABLED
        )
    assert len(rig.receiver.requests) == 1
    dead = [(d.attempts, d.error) for d in await dead_letters(rig.redis, rig.settings)]
    assert dead == [(1, "410 Gone"), (1, "endpoint disabled")]
    # Nothing new is routed to it.
    await rig.route_one(endpoint)
    assert await rig.queued() == []


def http_date_in(delta: timedelta) -> str:
    return format_datetime(datetime.now(UTC) + delta, usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after", "defer_ms", "paused"),
    [
        pytest.param(429, lambda: "120", 120_000, True, id="429-longer-than-schedule"),
        pytest.param(503, lambda: "2", 5_000, True, id="503-shorter-than-schedule"),
        pytest.param(500, lambda: "120", 120_000, False, id="500-no-pause"),
        pytest.param(
            429, lambda: http_date_in(timedelta(days=1)), 600_000, True, id="date-clamped"
        ),
        pytest.param(429, lambda: "soon", 5_000, True, id="unreadable"),
    ],
)
async def test_retry_after_stretches_the_next_delay_within_its_bound(
    rig: Rig, status: int, retry_after: Callable[[], str], defer_ms: int, paused: bool
) -> None:
    rig.settings = rig.settings.replace(webhook_retry_after_max_s=600)
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [answer(status, "later", **{"retry-after": retry_after()})]
    msg_id = await rig.route_one(endpoint)
    async with rig.deliverer() as deliverer:
        (first,) = await rig.queued()
        assert await deliverer.attempt(first.job) == Outcome.RETRYING
    (second,) = await rig.queued()
    assert (second.job, second.defer_ms) == (AttemptJob(endpoint.id, msg_id, 2), defer_ms)
    # 429 and 5xx-unavailable answers also pause the endpoint for every worker.
    assert await rig.redis.exists(rig.keys.endpoint_pause(endpoint.id)) == int(paused)
    assert await rig.log(endpoint) == [(1, status, "failure", "later", "")]


async def test_the_logged_response_is_cut_at_the_bound(rig: Rig) -> None:
    rig.settings = rig.settings.replace(webhook_response_max_bytes=8)
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [answer(200, "x" * 10_000)]
    await rig.route_one(endpoint)
    outcomes, _ = await run_schedule(rig, endpoint)
    assert outcomes == [Outcome.DELIVERED]
    assert await rig.log(endpoint) == [(1, 200, "success", "xxxxxxxx", "")]


async def test_a_receivers_cookie_is_never_sent_back(rig: Rig) -> None:
    # Webhooks carry their signature, nothing a receiver asked to keep: a cookie
    # set by one answer must not ride on the next delivery (to it or anyone).
    endpoint = await rig.registry.add(rig.url)
    rig.receiver.answers = [
        answer(200, **{"set-cookie": "session=abc; Path=/"}),
        answer(200),
    ]
    async with rig.deliverer() as deliverer:
        await rig.route_one(endpoint)
        await rig.route_one(endpoint)
        for queued in await rig.queued():
            assert await deliverer.attempt(queued.job) == Outcome.DELIVERED
    first, second = rig.receiver.requests
    assert "cookie" not in first.headers and "cookie" not in second.headers
    assert second.headers["user-agent"].startswith("lcbus-webhooks/")


def test_outcomes_keep_their_wire_values() -> None:
    # arq stores them as job results and logs print them: the values are the contract.
    assert {o.name: o.value for o in Outcome} == {
        "DELIVERED": "delivered",
        "RETRYING": "retrying",
        "WAITING": "waiting",
        "DEAD": "dead",
        "RECEIVER_GONE": "gone",
        "FAILING_TOO_LONG": "disabled",
        "ENDPOINT_DISABLED": "endpoint-disabled",
        "ENDPOINT_REMOVED": "endpoint-gone",
        "MESSAGE_EXPIRED": "message-expired",
    }
    assert msgspec.json.encode(Outcome.RECEIVER_GONE) == b'"gone"'


async def test_a_busy_endpoint_puts_the_same_attempt_back(rig: Rig) -> None:
    endpoint = await rig.registry.add(rig.url, max_concurrency=1)
    msg_id = await rig.route_one(endpoint)
    # Another worker process holds the endpoint's one slot for the next minute.
    lease_end_ms = int((time.time() + 60) * 1000)
    await rig.redis.zadd(rig.keys.endpoint_slots(endpoint.id), {"other-process": lease_end_ms})
    async with rig.deliverer() as deliverer:
        (first,) = await rig.queued()
        assert await deliverer.attempt(first.job) == Outcome.WAITING
        (again,) = await rig.queued()
        assert again.job == AttemptJob(endpoint.id, msg_id, 1, wait=1)
        assert 40 <= again.defer_ms <= 60  # 50 ms of backoff, +-20 % jitter
        assert await deliverer.attempt(again.job) == Outcome.WAITING
        (third,) = await rig.queued()
        assert third.job == AttemptJob(endpoint.id, msg_id, 1, wait=2)
        assert 80 <= third.defer_ms <= 120
    assert rig.receiver.requests == []
    assert await rig.log(endpoint) == []
