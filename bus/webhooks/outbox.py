"""Webhook messages, attempt jobs, dead letters and replay.

A message is what one bus event becomes on the wire: the JSON body
``{type, timestamp, data}``, stored once in Redis (``keys.webhook_message``)
with a TTL covering the whole retry schedule, and sent to every endpoint the
event matches. Its id (``msg_`` + the event id) is the ``webhook-id`` header
of every attempt, so receivers can deduplicate.

Each attempt is one arq job ``deliver_webhook(endpoint_id, message_id,
attempt, wait, series)``. Its job id joins these, so when at-least-once
consumption hands the same event over twice, arq refuses the second job.
``series`` is empty for the first delivery and a fresh token per replay, so a
replay is not mistaken for a duplicate of the original.

After the last attempt (or when the endpoint is disabled or gone while the
message waits) the message, body included, goes to the webhook dead-letter
stream; :func:`replay` and :func:`replay_since` send dead letters again.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job

from bus.errors import EndpointNotFound, WebhookError
from bus.events import BaseEvent, to_builtins
from bus.keys import Keys
from bus.scripts import LuaScript, execute
from bus.settings import Settings

WORKER = "webhooks"
"""arq queue (``keys.arq_queue(WORKER)``) and consumer group of the webhook worker."""
JOB_FUNCTION = "deliver_webhook"

_MARGIN_S = 24 * 3600


def webhook_id(event: BaseEvent) -> str:
    """The id of the message an event becomes: its ``webhook-id`` header."""
    return "msg_" + event.id


def build_body(event: BaseEvent, wtype: str) -> bytes:
    data = to_builtins(event)
    data.pop("type", None)
    stamp = datetime.fromtimestamp(event.time, tz=UTC).isoformat().replace("+00:00", "Z")
    return msgspec.json.encode({"type": wtype, "timestamp": stamp, "data": data})


def message_ttl_s(settings: Settings) -> int:
    """Long enough for every attempt at the latest jitter, every wait, and a day more."""
    schedule = sum(settings.webhook_delays) * (1 + settings.webhook_jitter)
    return math.ceil(schedule + settings.webhook_retry_after_max_s + _MARGIN_S)


def job_id(endpoint_id: str, msg_id: str, attempt: int, wait: int = 0, series: str = "") -> str:
    parts = ["webhook", endpoint_id, msg_id]
    if series:
        parts.append(series)
    if attempt > 1:
        parts.append(f"a{attempt}")
    if wait:
        parts.append(f"w{wait}")
    return ":".join(parts)


class AttemptJob(msgspec.Struct, frozen=True):
    """One attempt of one message to one endpoint: the arguments of
    ``deliver_webhook(endpoint_id, msg_id, attempt, wait, series)``, in that order."""

    endpoint_id: str
    msg_id: str
    attempt: int
    """1 for the first attempt; the retry schedule counts these."""
    wait: int = 0
    """How often this attempt was put back because the endpoint had no free slot."""
    series: str = ""
    """Empty for the first delivery, a fresh token per replay."""

    @property
    def job_id(self) -> str:
        return job_id(self.endpoint_id, self.msg_id, self.attempt, self.wait, self.series)

    def retry(self) -> AttemptJob:
        """The next attempt of the schedule."""
        return msgspec.structs.replace(self, attempt=self.attempt + 1, wait=0)

    def put_back(self) -> AttemptJob:
        """The same attempt, queued again to wait for a free slot."""
        return msgspec.structs.replace(self, wait=self.wait + 1)


# arq's enqueue_job, one job per call, without its WATCH round trips: refuse
# the job if its job or result key exists, else store it and put it on the
# queue, atomically (what arq's WATCH/MULTI transaction guarantees).
# KEYS: job key, result key, queue. ARGV: job id, score, expiry ms, job bytes.
_ENQUEUE = LuaScript("""
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
""")


async def enqueue_attempts(
    arq: ArqRedis, settings: Settings, jobs: Sequence[AttemptJob], *, defer_s: float = 0.0
) -> list[bool]:
    """Queue attempts to run in ``defer_s``, in one round trip; False for each whose job
    id exists (a duplicate).

    The jobs are the ones ``arq.enqueue_job`` would write (same keys, job
    format, score and expiry), so arq's worker runs them unchanged.
    """
    if not jobs:
        return []
    keys = Keys(settings.prefix)
    queue = keys.arq_queue(WORKER)
    now_ms = int(time.time() * 1000)
    defer_ms = round(defer_s * 1000) if defer_s > 0 else 0

    def build(pipe: Any) -> None:
        for job in jobs:
            jid = job.job_id
            payload = serialize_job(
                JOB_FUNCTION,
                msgspec.structs.astuple(job),
                {},
                None,
                now_ms,
                serializer=arq.job_serializer,
            )
            job_keys = [keys.arq(job_key_prefix + jid), keys.arq(result_key_prefix + jid), queue]
            _ENQUEUE.queue(
                pipe, job_keys, [jid, now_ms + defer_ms, defer_ms + arq.expires_extra_ms, payload]
            )

    return [bool(r) for r in await execute(arq, (_ENQUEUE,), build)]


async def enqueue_attempt(
    arq: ArqRedis, settings: Settings, job: AttemptJob, *, defer_s: float = 0.0
) -> bool:
    """Queue one attempt; False if a job with its id already exists (a duplicate)."""
    (queued,) = await enqueue_attempts(arq, settings, [job], defer_s=defer_s)
    return queued


@dataclass(frozen=True, slots=True)
class DeadMessage:
    """One entry of the webhook dead-letter stream."""

    id: str
    endpoint_id: str
    message_id: str
    type: str
    attempts: int
    error: str
    at: float
    body: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "message_id": self.message_id,
            "type": self.type,
            "attempts": self.attempts,
            "error": self.error,
            "at": self.at,
            "body_bytes": len(self.body),
        }


async def dead_letter(
    redis: aioredis.Redis,
    settings: Settings,
    *,
    endpoint_id: str,
    msg_id: str,
    body: bytes,
    attempts: int,
    error: str,
) -> None:
    wtype = msgspec.json.decode(body).get("type", "")
    await redis.xadd(
        Keys(settings.prefix).webhook_dlq(),
        {
            b"endpoint_id": endpoint_id.encode(),
            b"message_id": msg_id.encode(),
            b"type": str(wtype).encode(),
            b"attempts": str(attempts).encode(),
            b"error": error.encode(errors="replace"),
            b"at": repr(time.time()).encode(),
            b"body": body,
        },
        maxlen=settings.webhook_dead_maxlen,
        approximate=True,
    )


def _dead(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadMessage:
    return DeadMessage(
        id=entry_id.decode(),
        endpoint_id=fields[b"endpoint_id"].decode(),
        message_id=fields[b"message_id"].decode(),
        type=fields.get(b"type", b"").decode(),
        attempts=int(fields.get(b"attempts", b"0")),
        error=fields.get(b"error", b"").decode(errors="replace"),
        at=float(fields.get(b"at", b"0")),
        body=fields[b"body"],
    )


async def dead_letters(
    redis: aioredis.Redis, settings: Settings, *, since: float = 0.0, limit: int | None = None
) -> list[DeadMessage]:
    """Dead letters from ``since`` (Unix seconds) on, oldest first."""
    start = f"{int(since * 1000)}-0" if since > 0 else "-"
    entries: Any = await redis.xrange(Keys(settings.prefix).webhook_dlq(), min=start, count=limit)
    return [_dead(entry_id, fields) for entry_id, fields in entries]


async def _resend(
    redis: aioredis.Redis, arq: ArqRedis, settings: Settings, dead: list[DeadMessage]
) -> int:
    keys = Keys(settings.prefix)
    sent = 0
    for item in dead:
        exists = await redis.exists(keys.endpoint(item.endpoint_id))
        if not exists:
            raise EndpointNotFound(
                f"dead letter {item.id}: endpoint {item.endpoint_id!r} no longer exists"
            )
        # Same message id (receivers deduplicate), a new series of job ids.
        await redis.set(
            keys.webhook_message(item.message_id), item.body, ex=message_ttl_s(settings)
        )
        series = "r" + secrets.token_hex(4)
        await enqueue_attempt(
            arq, settings, AttemptJob(item.endpoint_id, item.message_id, 1, 0, series)
        )
        await redis.xdel(keys.webhook_dlq(), item.id)
        sent += 1
    return sent


async def replay(redis: aioredis.Redis, arq: ArqRedis, settings: Settings, msg_id: str) -> int:
    """Send a dead-lettered message again (to each endpoint it failed for)."""
    matching = [d for d in await dead_letters(redis, settings) if d.message_id == msg_id]
    if not matching:
        raise WebhookError(f"no dead letter for message {msg_id!r}")
    return await _resend(redis, arq, settings, matching)


async def replay_since(
    redis: aioredis.Redis, arq: ArqRedis, settings: Settings, since: float
) -> int:
    """Send every dead letter since ``since`` (Unix seconds) again; how many."""
    dead = await dead_letters(redis, settings, since=since)
    keys = Keys(settings.prefix)
    live = []
    for item in dead:
        if await redis.exists(keys.endpoint(item.endpoint_id)):
            live.append(item)
    return await _resend(redis, arq, settings, live)
