"""The webhook worker's batch handler: bus events -> attempt jobs.

For each event it finds the enabled endpoints whose filters match, stores the
message once, and queues one first-attempt job per endpoint. Everything here
is idempotent, as at-least-once consumption requires: the message is stored
with ``SET NX`` and a job whose id already exists is refused (as arq's
``enqueue_job`` would; see :func:`bus.webhooks.outbox.enqueue_attempts`), so a
batch handed over twice queues nothing new.

The endpoint list is cached for ``webhook_registry_cache_ms``: registering or
enabling an endpoint takes effect within that time. A disabled endpoint that
the cache still lists gets nothing either, as the attempt re-reads it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from arq.connections import ArqRedis

from bus.keys import Keys
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from bus.webhooks.endpoints import Endpoint, Endpoints
from bus.webhooks.outbox import (
    AttemptJob,
    build_body,
    enqueue_attempts,
    message_ttl_s,
    webhook_id,
)
from bus.webhooks.types import webhook_type

_ENQUEUE_BATCH = 500


class Router:
    """``Router(redis=..., arq=..., settings=...)``; ``await router(deliveries)``."""

    def __init__(self, *, redis: aioredis.Redis, arq: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.arq = arq
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.endpoints = Endpoints(redis=redis, settings=settings)
        self._cache: list[Endpoint] = []
        self._cached_at = -float("inf")
        self._ttl_s = settings.webhook_registry_cache_ms / 1000
        self._message_ttl = message_ttl_s(settings)
        self.enqueued = 0
        self.duplicates = 0

    async def enabled_endpoints(self) -> list[Endpoint]:
        now = time.monotonic()
        if now - self._cached_at >= self._ttl_s:
            self._cache = [e for e in await self.endpoints.all() if e.enabled]
            self._cached_at = now
        return self._cache

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        endpoints = await self.enabled_endpoints()
        if not endpoints:
            return
        messages: dict[str, bytes] = {}
        jobs: list[tuple[str, str]] = []
        for delivery in deliveries:
            event = delivery.event
            wtype = webhook_type(event)
            if wtype is None:
                continue
            targets = [e.id for e in endpoints if e.wants(event, wtype)]
            if not targets:
                continue
            msg_id = webhook_id(event)
            messages[msg_id] = build_body(event, wtype)
            jobs += [(endpoint_id, msg_id) for endpoint_id in targets]
        if not jobs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for msg_id, body in messages.items():
                pipe.set(self.keys.webhook_message(msg_id), body, ex=self._message_ttl, nx=True)
            await pipe.execute()
        await self._enqueue(jobs)

    async def _enqueue(self, jobs: list[tuple[str, str]]) -> None:
        attempts = [AttemptJob(endpoint_id, msg_id, 1) for endpoint_id, msg_id in jobs]
        # One pipeline per slice bounds the size of a single Redis reply.
        for start in range(0, len(attempts), _ENQUEUE_BATCH):
            queued = await enqueue_attempts(
                self.arq, self.settings, attempts[start : start + _ENQUEUE_BATCH]
            )
            added = sum(queued)
            self.enqueued += added
            self.duplicates += len(queued) - added
