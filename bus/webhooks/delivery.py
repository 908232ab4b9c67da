"""One webhook delivery attempt: the arq job ``deliver_webhook``.

An attempt loads the endpoint and the stored message, takes a slot under the
endpoint's limits (waiting briefly in the process when only the endpoint's
own limit stands in the way, see :mod:`bus.webhooks.gate`; else it is deferred
as a new job, freeing the worker slot), POSTs the signed body once (no
redirects, total time bounded by ``webhook_timeout_s``), logs the attempt,
and decides what follows:

- 2xx: done; the endpoint's failure streak and slow-down end.
- 410 Gone: the endpoint is disabled and the message dead-lettered.
- anything else (status, timeout, connection error, SSRF refusal): the next
  attempt is queued as a new deferred job after the schedule's next delay
  (+-jitter) or the receiver's Retry-After if longer (within bounds); after the
  last one the message is dead-lettered. 429/502/503/504 also pause the whole
  endpoint. An endpoint failing for ``webhook_disable_after_s`` without a
  success is disabled.

Disabling publishes a ``webhook_endpoint_disabled`` bus event (webhook type
``webhook.endpoint_disabled``) on the partition of a synthetic trace
``webhook:<endpoint id>``, so other endpoints and consumers hear about it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.worker import Retry
from redis.exceptions import RedisError

from bus.errors import EndpointNotFound
from bus.events import WebhookEndpointDisabled, encode, new_event_id
from bus.keys import ENTRY_FIELD, Keys, partition_of
from bus.runtime.worker import worker_context
from bus.scripts import execute
from bus.settings import Settings
from bus.webhooks.endpoints import Attempt, Endpoint, Endpoints, decode_endpoint
from bus.webhooks.gate import LocalGates
from bus.webhooks.limits import BUSY, DISABLED, GONE, SCRIPTS, EndpointLimits, begin_reply
from bus.webhooks.outbox import AttemptJob, dead_letter, enqueue_attempt
from bus.webhooks.sender import Result, Sender

log = logging.getLogger(__name__)

SLOW_DOWN_STATUSES = frozenset({429, 502, 503, 504})
_MAX_WAIT_S = 2.0
_REDIS_RETRY_S = 2.0
_MAX_UNSETTLED = 10_000
"""Sent attempts remembered while Redis cannot record their outcome."""
_json = msgspec.json.encode


class Outcome(StrEnum):
    """What one ``deliver_webhook`` job did: its arq result, and what logs show."""

    DELIVERED = "delivered"
    RETRYING = "retrying"
    """It failed; the next attempt of the schedule is queued."""
    WAITING = "waiting"
    """The endpoint had no free slot; the same attempt is queued again."""
    DEAD = "dead"
    """It failed and was the schedule's last: the message is dead-lettered."""
    RECEIVER_GONE = "gone"
    """The receiver answered 410 Gone: the endpoint is disabled, the message dead-lettered."""
    FAILING_TOO_LONG = "disabled"
    """The endpoint failed for ``webhook_disable_after_s``: disabled, message dead-lettered."""
    ENDPOINT_DISABLED = "endpoint-disabled"
    """The endpoint was disabled before this attempt: the message is dead-lettered."""
    ENDPOINT_REMOVED = "endpoint-gone"
    MESSAGE_EXPIRED = "message-expired"


def retry_after_s(value: str | None, *, now: float, bound: float) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), clamped to [0, bound]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), bound)


def jittered(delay: float, jitter: float) -> float:
    return delay * random.uniform(1 - jitter, 1 + jitter)


@dataclass(frozen=True, slots=True)
class _Posted:
    """An attempt sent whose outcome is not recorded yet."""

    endpoint: Endpoint
    body: bytes
    result: Result
    token: str


class Deliverer:
    """Makes attempts; one per worker process, kept in arq's ctx.

    An attempt that was sent but whose outcome Redis failed to record (Redis
    went away right after the POST) is re-run by arq; the same process then
    records the remembered outcome instead of sending the message again.

    ``ssl_context`` is the TLS trust of the POSTs (default: certifi's roots;
    tests pass one trusting their own CA).
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        arq: ArqRedis,
        settings: Settings,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.redis = redis
        self.arq = arq
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.endpoints = Endpoints(redis=redis, settings=settings)
        self.limits = EndpointLimits(
            redis=redis, keys=self.keys, lease_ms=int((settings.webhook_timeout_s + 5) * 1000)
        )
        self.gates = LocalGates(
            max_waiting=max(1, settings.webhook_max_jobs // 2),
            wait_s=settings.webhook_local_wait_ms / 1000,
        )
        self._sizes: dict[str, int] = {}
        self._unsettled: dict[str, _Posted] = {}
        """By job id: attempts sent whose outcome Redis did not take."""
        self.sender = Sender(settings=settings, allow=self.endpoints.allow, ssl_context=ssl_context)

    async def aclose(self) -> None:
        await self.sender.aclose()

    async def __aenter__(self) -> Deliverer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def attempt(self, job: AttemptJob) -> Outcome:
        """Make one attempt; returns what happened (for logs and tests)."""
        endpoint_id = job.endpoint_id
        size = self._sizes.get(endpoint_id) or await self._size(endpoint_id)
        local = await self.gates.enter(endpoint_id, size)
        if local is None:
            # The line here is full: come back when it is this attempt's turn.
            drain_ms = int(self.gates.defer_s(endpoint_id) * 1000)
            await self._wait(job, drain_ms or BUSY)
            return Outcome.WAITING
        try:
            return await self._attempt(job)
        finally:
            local.release()

    async def _size(self, endpoint_id: str) -> int:
        # First attempt for this endpoint in this process: its local gate's width.
        raw = await self.redis.hget(self.keys.endpoint(endpoint_id), "max_concurrency")
        return int(raw) if raw else 1

    async def _begin(self, job: AttemptJob, token: str) -> tuple[int, Any, Any]:
        """One round trip: the message, the endpoint record, and a slot if one is free."""
        deadline = time.monotonic() + self.gates.wait_s

        def queue_begin(pipe: Any) -> None:
            pipe.get(self.keys.webhook_message(job.msg_id))
            self.limits.queue_begin(pipe, job.endpoint_id, token)

        while True:
            body, reply = await execute(self.redis, SCRIPTS, queue_begin)
            code, raw = begin_reply(reply)
            # A short pause or rate window is the endpoint's own limit: wait it
            # out here rather than queue a new job.
            if code > 0 and time.monotonic() + code / 1000 <= deadline:
                await asyncio.sleep(code / 1000)
                continue
            return code, raw, body

    async def _attempt(self, job: AttemptJob) -> Outcome:
        posted = self._unsettled.pop(job.job_id, None)
        if posted is not None:
            # This process already sent this attempt; Redis failed while it
            # recorded the outcome. Record it now rather than POST again.
            return await self._settle_posted(job, posted)
        token = secrets.token_hex(8)
        code, raw, body = await self._begin(job, token)
        if code == GONE:
            self._sizes.pop(job.endpoint_id, None)
            log.info("webhook %s for removed endpoint %s dropped", job.msg_id, job.endpoint_id)
            return Outcome.ENDPOINT_REMOVED
        endpoint = decode_endpoint(raw)
        self._sizes[job.endpoint_id] = endpoint.max_concurrency
        if body is None:
            if code == 0:
                await self.limits.release(job.endpoint_id, token)
            log.error(
                "webhook %s for %s expired before attempt %d",
                job.msg_id,
                job.endpoint_id,
                job.attempt,
            )
            return Outcome.MESSAGE_EXPIRED
        if code == DISABLED:
            await self._dead(job, body, job.attempt - 1, "endpoint disabled")
            return Outcome.ENDPOINT_DISABLED
        if code != 0:
            # BUSY with a local slot held: other processes hold the endpoint's slots.
            await self._wait(job, code)
            return Outcome.WAITING
        try:
            result = await self.sender.post(endpoint, job.msg_id, body)
        except BaseException:
            await self.limits.release(job.endpoint_id, token)
            raise
        return await self._settle_posted(job, _Posted(endpoint, body, result, token))

    async def _settle_posted(self, job: AttemptJob, posted: _Posted) -> Outcome:
        """Record a sent attempt; if Redis fails meanwhile, remember it for arq's re-run."""
        try:
            return await self._settle(
                job, posted.endpoint, posted.body, posted.result, posted.token
            )
        except RedisError:
            self._unsettled[job.job_id] = posted
            while len(self._unsettled) > _MAX_UNSETTLED:
                del self._unsettled[next(iter(self._unsettled))]
            raise

    async def _wait(self, job: AttemptJob, wait_ms: int) -> None:
        # BUSY has no natural end: back off exponentially so a queue of waiting
        # deliveries for a slow endpoint does not spin.
        backoff = min(0.05 * 2**job.wait, _MAX_WAIT_S)
        delay = max(wait_ms / 1000, backoff if wait_ms < 0 else 0.0)
        await enqueue_attempt(self.arq, self.settings, job.put_back(), defer_s=jittered(delay, 0.2))

    async def _settle(
        self, job: AttemptJob, endpoint: Endpoint, body: bytes, result: Result, token: str
    ) -> Outcome:
        if await self._finish(job, body, result, token) < 0:
            raise EndpointNotFound(endpoint.id)
        if result.ok:
            return Outcome.DELIVERED
        if result.status == 410:
            await self._disable(endpoint, "the endpoint answered 410 Gone")
            await self._dead(job, body, job.attempt, "410 Gone")
            return Outcome.RECEIVER_GONE
        return await self._failed(job, endpoint, body, result)

    async def _failed(
        self, job: AttemptJob, endpoint: Endpoint, body: bytes, result: Result
    ) -> Outcome:
        now = time.time()
        bound = self.settings.webhook_retry_after_max_s
        retry_after = retry_after_s(result.retry_after, now=now, bound=bound)
        if result.status in SLOW_DOWN_STATUSES:
            pause_ms = None if retry_after is None else int(retry_after * 1000)
            await self.limits.slow_down(endpoint.id, retry_after_ms=pause_ms)
        await self.endpoints.update(endpoint.id, only_unset=True, failing_since=now)
        failing_since = endpoint.failing_since or now
        if now - failing_since >= self.settings.webhook_disable_after_s:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(failing_since))
            await self._disable(endpoint, f"failing without a success since {since} UTC")
            await self._dead(job, body, job.attempt, result.describe())
            return Outcome.FAILING_TOO_LONG
        delays = self.settings.webhook_delays
        if job.attempt >= len(delays):
            await self._dead(job, body, job.attempt, result.describe())
            return Outcome.DEAD
        delay = jittered(delays[job.attempt], self.settings.webhook_jitter)
        if retry_after is not None:
            delay = max(delay, retry_after)
        await enqueue_attempt(self.arq, self.settings, job.retry(), defer_s=delay)
        return Outcome.RETRYING

    async def _finish(self, job: AttemptJob, body: bytes, result: Result, token: str) -> int:
        """Free the slot, log the attempt, record a success: one round trip."""
        now = time.time()
        record = Attempt(
            id="",
            message_id=job.msg_id,
            attempt=job.attempt,
            type=_type_of(body),
            outcome=result.outcome,
            status=result.status,
            latency_ms=round(result.latency_ms, 2),
            response=result.response,
            error=result.error,
            at=now,
        )
        (done,) = await execute(
            self.redis,
            SCRIPTS,
            lambda pipe: self.limits.queue_finish(
                pipe,
                job.endpoint_id,
                token,
                record=_json(record),
                maxlen=self.settings.webhook_attempts_maxlen,
                success_at=_json(now) if result.ok else None,
            ),
        )
        return int(done)

    async def _dead(self, job: AttemptJob, body: bytes, attempts: int, error: str) -> None:
        log.warning("webhook %s to %s dead-lettered: %s", job.msg_id, job.endpoint_id, error)
        await dead_letter(
            self.redis,
            self.settings,
            endpoint_id=job.endpoint_id,
            msg_id=job.msg_id,
            body=body,
            attempts=attempts,
            error=error,
        )

    async def _disable(self, endpoint: Endpoint, reason: str) -> None:
        if await self.endpoints.disable(endpoint.id, reason):
            log.warning("webhook endpoint %s disabled: %s", endpoint.id, reason)
            await publish_disabled(self.redis, self.settings, endpoint, reason)


def _type_of(body: bytes) -> str:
    # The body starts with {"type":"..." (build_body writes it first).
    head = body[:200].split(b'"', 4)
    return head[3].decode(errors="replace") if len(head) > 3 else ""


async def publish_disabled(
    redis: aioredis.Redis, settings: Settings, endpoint: Endpoint, reason: str
) -> None:
    """Put a ``webhook_endpoint_disabled`` event on the bus."""
    trace_id = f"webhook:{endpoint.id}"
    now = time.time()
    event = WebhookEndpointDisabled(
        id=new_event_id(),
        time=now,
        run_id=trace_id,
        trace_id=trace_id,
        seq=int(now * 1000),
        name="webhook",
        run_type="webhook",
        source="webhooks",
        endpoint_id=endpoint.id,
        url=endpoint.url,
        reason=reason,
    )
    await redis.xadd(
        Keys(settings.prefix, settings.partitions).events(
            partition_of(trace_id, settings.partitions)
        ),
        {ENTRY_FIELD: encode(event)},
        maxlen=settings.stream_maxlen,
        approximate=True,
    )


async def deliver_webhook(
    ctx: dict[str, Any],
    endpoint_id: str,
    msg_id: str,
    attempt: int,
    wait: int = 0,
    series: str = "",
) -> Outcome:
    """arq job: one attempt (its arguments are an :class:`AttemptJob`'s fields).

    HTTP failures are handled inside (they schedule the next attempt). Only
    Redis trouble escapes, as arq's ``Retry``, so arq runs this job again.
    """
    deliverer = worker_context(ctx).service(Deliverer)
    job = AttemptJob(endpoint_id, msg_id, attempt, wait, series)
    try:
        return await deliverer.attempt(job)
    except EndpointNotFound:
        log.info("webhook %s: endpoint %s removed during the attempt", msg_id, endpoint_id)
        return Outcome.ENDPOINT_REMOVED
    except RedisError as exc:
        log.warning("webhook attempt %s/%s #%d: %s", endpoint_id, msg_id, attempt, exc)
        raise Retry(defer=_REDIS_RETRY_S) from exc
