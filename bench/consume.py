"""Consumer throughput: one GroupConsumer vs a raw XREADGROUP + XACK loop.

Both read the same N entries (one partition, each side its own group) in the
same run against the same Redis, through the same client, ``read_count``
entries per read. The consumer decodes every event, calls a no-op handler and
acknowledges; the raw loop only reads and acknowledges, so the ratio is the
cost of leases, decoding and bookkeeping. Both acknowledge a batch with the
next read (one round trip per batch), and both clocks stop when the last batch
is in hand, before its acknowledgement.

The machine is shared and a run lasts well under a second, so the two sides
alternate over ``--rounds`` rounds (the one going first alternating too), and
the ratio is the median of the rounds' ratios.

    python -m bench.consume [--events N] [--rounds R]

The last line is JSON: events_per_s, raw_events_per_s (medians), ratio, ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


async def _raw(client: aioredis.Redis, stream: str, group: str, events: int, count: int) -> float:
    """Read and acknowledge, each batch's XACK pipelined with the next read."""
    started = time.perf_counter()
    await client.xgroup_create(stream, group, id="0")
    done = 0
    unacked: list[bytes] = []
    while done < events:
        async with client.pipeline(transaction=False) as pipe:
            if unacked:
                pipe.xack(stream, group, *unacked)
            pipe.xreadgroup(group, "c", {stream: ">"}, count=count, block=1000)
            replies = await pipe.execute()
        entries = replies[-1][0][1]
        unacked = [entry_id for entry_id, _ in entries]
        done += len(entries)
    elapsed = time.perf_counter() - started
    await client.xack(stream, group, *unacked)
    return events / elapsed


async def _consumer(client: aioredis.Redis, settings: Settings, group: str, events: int) -> float:
    finished = asyncio.Event()
    seen = 0
    ended = 0.0

    async def handler(batch: Sequence[Delivery]) -> None:
        nonlocal seen, ended
        seen += len(batch)
        if seen >= events:
            ended = time.perf_counter()
            finished.set()

    consumer = GroupConsumer(redis=client, settings=settings, group=group, handler=handler)
    started = time.perf_counter()
    await consumer.start()
    await finished.wait()
    await consumer.aclose()
    return events / (ended - started)


async def run(events: int, rounds: int) -> dict[str, object]:
    settings = Settings(
        redis_url=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        prefix=f"lcbus-bench-{uuid.uuid4().hex[:8]}",
        partitions=1,
        read_count=256,
    )
    stream = Keys(settings.prefix, settings.partitions).events(0)
    client = aioredis.Redis.from_url(settings.redis_url)
    raws: list[float] = []
    ours: list[float] = []
    try:
        await _fill(client, stream, events)
        for index in range(rounds):
            raw = _raw(client, stream, f"raw-{index}", events, settings.read_count)
            consumer = _consumer(client, settings, f"bench-{index}", events)
            if index % 2 == 0:
                raws.append(await raw)
                ours.append(await consumer)
            else:
                ours.append(await consumer)
                raws.append(await raw)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{settings.prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    ratios = [round(o / r, 3) for o, r in zip(ours, raws, strict=True)]
    return {
        "events": events,
        "rounds": rounds,
        "events_per_s": round(statistics.median(ours)),
        "raw_events_per_s": round(statistics.median(raws)),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(run(args.events, args.rounds))
    print(
        f"GroupConsumer {result['events_per_s']:,} ev/s vs raw XREADGROUP+XACK "
        f"{result['raw_events_per_s']:,} ev/s over {args.events:,} entries, "
        f"median of {args.rounds} rounds"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
