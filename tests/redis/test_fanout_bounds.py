"""Poison input for the fan-out worker, through the real consumer: an event whose
index or size breaks a bound is dead-lettered with the reason, at once, and the
trace it belongs to flows on around it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from bus import events as ev
from bus.fanout.handler import FanoutHandler
from bus.fanout.messages import MAX_BLOCKS
from bus.history import Topic
from bus.keys import Keys
from bus.runtime import deadletter
from bus.runtime.consumer import GroupConsumer
from bus.settings import Settings
from tests.support.protocol import history, text_of

TRACE = "poisoned-trace"


def _stream(seq: int, data: dict[str, Any]) -> ev.StreamEvent:
    return ev.StreamEvent(
        id=f"s{seq}",
        time=time.time(),
        run_id=TRACE,
        trace_id=TRACE,
        seq=seq,
        run_type="chat_model",
        source="app",
        data=data,
    )


def _delta(seq: int, index: int, text: str) -> ev.StreamEvent:
    delta = {"type": "text-delta", "text": text}
    return _stream(seq, {"event": "content-block-delta", "index": index, "delta": delta})


def _events() -> tuple[list[ev.BaseEvent], list[ev.BaseEvent]]:
    common: dict[str, Any] = {"time": time.time(), "run_id": TRACE, "trace_id": TRACE}
    common |= {"source": "app", "run_type": "chat_model", "name": "model"}
    text_start = {
        "event": "content-block-start",
        "index": 0,
        "content": {"type": "text", "text": ""},
    }
    far_start = {**text_start, "index": 4_000_000}
    poison = [_stream(5, far_start), _delta(7, -1, "?"), _delta(8, MAX_BLOCKS, "?")]
    events: list[ev.BaseEvent] = [
        ev.ChatModelStart(id="s1", seq=1, **common),
        _stream(2, {"event": "message-start", "role": "ai", "id": "m1"}),
        _stream(3, text_start),
        _delta(4, 0, "hello "),
        poison[0],
        _delta(6, 0, "wor"),
        poison[1],
        poison[2],
        _delta(9, 0, "ld"),
        _stream(10, {"event": "message-finish"}),
        ev.LLMEnd(id="s11", seq=11, text="hello world", **common),
    ]
    return events, poison


async def test_an_index_past_its_bound_is_dead_lettered_and_the_trace_flows_on(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = settings.replace(
        partitions=1, lease_ttl_ms=1500, read_block_ms=200, retry_backoff_ms=1
    )
    keys = Keys(settings.prefix)
    events, poison = _events()
    entry_ids = [sync_redis.xadd(keys.events(0), {b"e": ev.encode(e)}).decode() for e in events]
    handler = FanoutHandler(redis=async_redis, settings=settings)
    async with GroupConsumer(
        redis=async_redis, settings=settings, group="fanout", handler=handler
    ) as consumer:
        deadline = time.monotonic() + 15
        while consumer.stats.processed + consumer.stats.dead_lettered < len(events):
            assert time.monotonic() < deadline, consumer.stats.as_dict()
            await asyncio.sleep(0.02)
    letters = await deadletter.list_dead_letters(async_redis, settings, "fanout")
    assert [(d.reason, d.entry_id, d.payload) for d in letters] == [
        (deadletter.REASON_REJECTED, entry_ids[events.index(p)], ev.encode(p)) for p in poison
    ]
    assert [d.error for d in letters] == [
        f"EventRejected: content block index {index} outside 0..{MAX_BLOCKS - 1}"
        for index in (4_000_000, -1, MAX_BLOCKS)
    ]
    # Refused at once: one failed call per poison event and its batch, no retries.
    assert consumer.stats.failed == 1 + len(poison)
    stored = await history(async_redis, settings, Topic("trace", TRACE))
    assert text_of(stored) == "hello world" and stored[-1]["final"]
    assert await async_redis.memory_usage(keys.fanout_state(TRACE)) < 4096
