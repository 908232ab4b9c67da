"""The webhook worker's batch handler: bus events -> attempt jobs.

For each event it finds the enabled endpoints whose filters match, stores the
message once, and queues one first-attempt job per endpoint. Everything here
is idempotent, as at-least-once consumption requires: the message is stored
with ``SET NX`` and a job whose id already exists is refused (as arq's
``enqueue_job`` would; see :func:`bus.webhooks.outbox.enqueue_attempts`), so a
batch handed over twice queues nothing new.

The endpoint list is cached, and every batch first reads the registry's
version, which each change through :class:`Endpoints` (add, update, enable,
disable, remove) increments: an endpoint registered before an event was
published gets that event, however soon the event follows. The list is also
re-read every ``webhook_registry_cache_ms``, for changes made past
:class:`Endpoints`. A disabled endpoint that the cache still lists gets
nothing either, as the attempt re-reads it.

Token events (``llm.new_token``, ``stream.event``) do not repeat their run's
tags and metadata: those ride on the run's start. When an endpoint filters
token types on tags or metadata, the router keeps each run's tags and
metadata from its start, in memory and in Redis for a day (another replica
may take the partition over mid-run), and matches the tokens against them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis

from bus.events import BaseEvent, LLMNewToken, RunStart, StreamEvent
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
from bus.webhooks.types import TOKEN_TYPES, webhook_type

_ENQUEUE_BATCH = 500
RUN_INFO_TTL_S = 86_400
_RUN_MEMORY = 10_000
RunInfo = tuple[list[str], dict[str, Any]]
"""A run's tags and metadata."""
_run_info_decoder = msgspec.msgpack.Decoder(tuple[list[str], dict[str, Any]])


class Router:
    """``Router(redis=..., arq=..., settings=...)``; ``await router(deliveries)``."""

    def __init__(self, *, redis: aioredis.Redis, arq: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.arq = arq
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.endpoints = Endpoints(redis=redis, settings=settings)
        self._cache: list[Endpoint] = []
        self._cached_at = -float("inf")
        self._cached_version: object = None
        self._ttl_s = settings.webhook_registry_cache_ms / 1000
        self._message_ttl = message_ttl_s(settings)
        self.enqueued = 0
        self.duplicates = 0
        self._runs: OrderedDict[str, RunInfo] = OrderedDict()

    async def enabled_endpoints(self) -> list[Endpoint]:
        # The version is read before the list: a change landing in between shows as a
        # new version with the next batch, which reads the list again.
        version: Any = await self.redis.get(self.keys.endpoints_version())
        now = time.monotonic()
        if version != self._cached_version or now - self._cached_at >= self._ttl_s:
            self._cache = [e for e in await self.endpoints.all() if e.enabled]
            self._cached_at = now
            self._cached_version = version
        return self._cache

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        endpoints = await self.enabled_endpoints()
        if not endpoints:
            return
        runs = await self._run_infos(deliveries) if _filters_tokens(endpoints) else None
        messages: dict[str, bytes] = {}
        jobs: list[tuple[str, str]] = []
        for delivery in deliveries:
            event = delivery.event
            wtype = webhook_type(event)
            if wtype is None:
                continue
            subject = event
            if runs is not None and wtype in TOKEN_TYPES and not (event.tags or event.metadata):
                info = runs.get(event.run_id)
                if info is not None:
                    subject = msgspec.structs.replace(event, tags=info[0], metadata=info[1])
            targets = [e.id for e in endpoints if e.wants(subject, wtype)]
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

    async def _run_infos(self, deliveries: Sequence[Delivery]) -> dict[str, RunInfo]:
        """Tags and metadata of the runs of these deliveries' token events; stores those of
        the runs that start here."""
        found: dict[str, RunInfo] = {}
        started: dict[str, bytes] = {}
        wanted: set[str] = set()
        for delivery in deliveries:
            event = delivery.event
            if isinstance(event, RunStart):
                found[event.run_id] = self._remember(event)
                started[event.run_id] = msgspec.msgpack.encode(found[event.run_id])
            elif _lacks_run_info(event) and event.run_id not in found:
                known = self._runs.get(event.run_id)
                if known is None:
                    wanted.add(event.run_id)
                else:
                    found[event.run_id] = known
        wanted -= found.keys()
        if not started and not wanted:
            return found
        ordered = sorted(wanted)
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id, blob in started.items():
                pipe.set(self.keys.webhook_run(run_id), blob, ex=RUN_INFO_TTL_S)
            for run_id in ordered:
                pipe.get(self.keys.webhook_run(run_id))
            replies = await pipe.execute()
        for run_id, blob in zip(ordered, replies[len(started) :], strict=True):
            if blob is not None:
                found[run_id] = self._runs[run_id] = _run_info_decoder.decode(blob)
        return found

    def _remember(self, event: BaseEvent) -> RunInfo:
        info = self._runs[event.run_id] = (event.tags, event.metadata)
        while len(self._runs) > _RUN_MEMORY:
            self._runs.popitem(last=False)
        return info

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


def _filters_tokens(endpoints: Sequence[Endpoint]) -> bool:
    """Whether an endpoint takes token types and filters them on tags or metadata."""
    return any(
        (e.tags or e.metadata) and any(p in TOKEN_TYPES for p in e.events) for e in endpoints
    )


def _lacks_run_info(event: BaseEvent) -> bool:
    return isinstance(event, LLMNewToken | StreamEvent) and not (event.tags or event.metadata)
