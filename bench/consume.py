"""Consumer throughput: one GroupConsumer vs a raw XREADGROUP + XACK loop.

Both read the same N entries (one partition, each side its own group) in the
same run against the same Redis. The consumer decodes every event, calls a
no-op handler and acknowledges; the raw loop only reads and acknowledges, so
the ratio is the cost of leases, decoding and bookkeeping.

    python -m bench.consume [--events N]

The last line is JSON: events_per_s, raw_events_per_s, ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis

from bus.events import CustomEvent, encode
from bus.keys import Keys
from bus.runtime.consumer import Delivery, GroupConsumer
from bus.settings import DEFAULT_REDIS_URL, Settings


async def _fill(client: aioredis.Redis, stream: str, events: int) -> None:
    payloads = [
        encode(CustomEvent(id=f"e{i}", time=0.0, run_id="r", trace_id="t", seq=i, data={"i": i}))
        for i in range(events)
    ]
    for start in range(0, events, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + 1000]:
                pipe.xadd(stream, {b"e": payload})
            await pipe.execute()


async def _raw(client: aioredis.Redis, stream: str, events: int, count: int) -> float:
    await client.xgroup_create(stream, "raw", id="0")
    started = time.perf_counter()
    done = 0
    while done < events:
        reply = await client.xreadgroup("raw", "c", {stream: ">"}, count=count, block=1000)
        entries = reply[0][1]
        await client.xack(stream, "raw", *[entry_id for entry_id, _ in entries])
        done += len(entries)
    return events / (time.perf_counter() - started)


async def _consumer(client: aioredis.Redis, settings: Settings, events: int) -> float:
    finished = asyncio.Event()
    seen = 0

    async def handler(batch: Sequence[Delivery]) -> None:
        nonlocal seen
        seen += len(batch)
        if seen >= events:
            finished.set()

    consumer = GroupConsumer(redis=client, settings=settings, group="bench", handler=handler)
    started = time.perf_counter()
    await consumer.start()
    await finished.wait()
    elapsed = time.perf_counter() - started
    await consumer.aclose()
    return events / elapsed


async def run(events: int) -> dict[str, float]:
    settings = Settings(
        redis_url=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        prefix=f"lcbus-bench-{uuid.uuid4().hex[:8]}",
        partitions=1,
        read_count=256,
    )
    stream = Keys(settings.prefix, settings.partitions).events(0)
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await _fill(client, stream, events)
        raw = await _raw(client, stream, events, settings.read_count)
        ours = await _consumer(client, settings, events)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{settings.prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    return {
        "events": events,
        "events_per_s": round(ours),
        "raw_events_per_s": round(raw),
        "ratio": round(ours / raw, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    result = asyncio.run(run(args.events))
    print(
        f"GroupConsumer {result['events_per_s']:,} ev/s vs raw XREADGROUP+XACK "
        f"{result['raw_events_per_s']:,} ev/s over {args.events:,} entries"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
