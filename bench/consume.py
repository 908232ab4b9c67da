"""Consumer throughput: one GroupConsumer vs a raw XREADGROUP + XACK loop.

All sides read the same N entries (one partition, each side its own group) in
the same run against the same Redis, ``read_count`` entries per read. The
consumer decodes every event, calls a no-op handler and acknowledges; the raw
loops only read and acknowledge, so the ratios are the cost of leases, decoding
and bookkeeping. Each acknowledges a batch with a later read (one round trip
per batch). Every clock starts when the first batch is in hand and stops when
the last one is, before its acknowledgement: what is timed is the flow of
batches, not the one-off start (creating the group; for the consumer also
joining the membership and taking the lease, several round trips). The
baselines:

- ``raw``: the plain loop through redis-py (a pipeline per batch), its replies
  left as Redis sent them (redis-py's parsing would build a dict per entry the
  loop has no use for). ``ratio`` is against this one.
- ``bare``: the same loop with each round trip packed by hand
  (:mod:`bus.runtime.roundtrip`, as the consumer does on a standalone Redis):
  the least a client can do per batch. ``bare_ratio`` is against this one.

The machine is shared and a run lasts well under a second, so after one
untimed round (first calls, script loads) the sides take turns over
``--rounds`` rounds (the one going first rotating too), and each ratio is the
median of the rounds' ratios. Each side starts from a collected and frozen
heap, as a worker does once started (:mod:`bus.runtime.worker`): a full
collection then walks only the objects that side made, instead of landing on
whichever side happens to cross the threshold with the whole process's heap.

    python -m bench.consume [--events N] [--rounds R]

The last line is JSON: events_per_s, raw_events_per_s (medians), ratio, ratios,
bare_events_per_s, bare_ratio, bare_ratios, and cpu_us_per_event (ours, raw,
bare: this process's CPU per event, medians; steadier than the rates when other
processes compete for the cores, but blind to work overlapping Redis's).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from bus.events import CustomEvent, encode
from bus.keys import Keys
from bus.runtime.consumer import Delivery, GroupConsumer
from bus.runtime.roundtrip import round_trip, xack, xreadgroup
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


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def _raw_replies(client: aioredis.Redis) -> aioredis.Redis:
    """A copy of ``client`` (same pool) whose XREADGROUP replies stay as Redis sent them."""
    raw = copy.copy(client)
    raw.response_callbacks = copy.copy(client.response_callbacks)
    raw.set_response_callback("XREADGROUP", _as_sent)
    return raw


ReadAcking = Callable[[list[bytes]], Awaitable[list[Any]]]
"""One round trip: the XACK of the given ids (when any), then the next XREADGROUP."""


async def _raw(
    client: aioredis.Redis, stream: str, group: str, events: int, count: int
) -> tuple[float, float]:
    """Read and acknowledge, each batch's XACK pipelined with the next read."""
    client = _raw_replies(client)

    async def read_acking(unacked: list[bytes]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            if unacked:
                pipe.xack(stream, group, *unacked)
            pipe.xreadgroup(group, "c", {stream: ">"}, count=count, block=1000)
            return await pipe.execute()

    return await _read_loop(client, stream, group, events, read_acking)


async def _bare(
    client: aioredis.Redis, stream: str, group: str, events: int, count: int
) -> tuple[float, float]:
    """:func:`_raw` with each round trip packed by hand."""
    key, name = stream.encode(), group.encode()
    read = xreadgroup(key, name, b"c", b">", count, 1000)

    async def read_acking(unacked: list[bytes]) -> list[Any]:
        commands = [xack(key, name, unacked), read] if unacked else [read]
        return await round_trip(client, commands, len(commands))

    return await _read_loop(client, stream, group, events, read_acking)


async def _read_loop(
    client: aioredis.Redis, stream: str, group: str, events: int, read_acking: ReadAcking
) -> tuple[float, float]:
    """Consume ``events`` with ``read_acking``, clocked from the first batch in hand."""
    _settle_heap()
    await client.xgroup_create(stream, group, id="0")
    done = first = 0
    started = cpu = 0.0
    unacked: list[bytes] = []
    while done < events:
        reply = (await read_acking(unacked))[-1]
        # RESP3 answers a map {stream: entries}, RESP2 [[stream, entries]].
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        unacked = [entry_id for entry_id, _ in entries]
        if not done:  # the first batch is in hand: the clock starts
            started, cpu, first = time.perf_counter(), time.process_time(), len(entries)
        done += len(entries)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await client.xack(stream, group, *unacked)
    return _figures(events - first, elapsed, cpu)


async def _consumer(
    client: aioredis.Redis, settings: Settings, group: str, events: int
) -> tuple[float, float]:
    finished = asyncio.Event()
    seen = first = 0
    started = ended = cpu = 0.0

    async def handler(batch: Sequence[Delivery]) -> None:
        nonlocal seen, first, started, ended, cpu
        if not seen:  # the first batch is in hand: the clock starts
            started, cpu, first = time.perf_counter(), time.process_time(), len(batch)
        seen += len(batch)
        if seen >= events:
            ended, cpu = time.perf_counter(), time.process_time() - cpu
            finished.set()

    consumer = GroupConsumer(redis=client, settings=settings, group=group, handler=handler)
    _settle_heap()
    await consumer.start()
    await finished.wait()
    await consumer.aclose()
    return _figures(events - first, ended - started, cpu)


def _figures(events: int, elapsed: float, cpu: float) -> tuple[float, float]:
    """Events per second, and this process's CPU µs per event (steadier on a busy machine)."""
    return events / elapsed, cpu / events * 1e6


def _settle_heap() -> None:
    """Collect what the previous side left and freeze the rest (see the module's doc)."""
    gc.collect()
    gc.freeze()


async def run(events: int, rounds: int) -> dict[str, object]:
    settings = Settings(
        redis_url=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        prefix=f"lcbus-bench-{uuid.uuid4().hex[:8]}",
        partitions=1,
        read_count=256,
    )
    stream = Keys(settings.prefix, settings.partitions).events(0)
    client = aioredis.Redis.from_url(settings.redis_url)
    figures: dict[str, list[float]] = {"ours": [], "raw": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "raw": [], "bare": []}
    count = settings.read_count
    try:
        await _fill(client, stream, events)
        await _raw(client, stream, "raw-warm-up", events, count)
        await _bare(client, stream, "bare-warm-up", events, count)
        await _consumer(client, settings, "bench-warm-up", events)
        sides: list[tuple[str, Callable[[int], Awaitable[tuple[float, float]]]]] = [
            ("raw", lambda index: _raw(client, stream, f"raw-{index}", events, count)),
            ("ours", lambda index: _consumer(client, settings, f"bench-{index}", events)),
            ("bare", lambda index: _bare(client, stream, f"bare-{index}", events, count)),
        ]
        for index in range(rounds):
            turn = index % len(sides)
            for name, side in sides[turn:] + sides[:turn]:
                rate, cpu_us = await side(index)
                figures[name].append(rate)
                cpu[name].append(cpu_us)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{settings.prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    ours = figures["ours"]
    ratios = [round(o / r, 3) for o, r in zip(ours, figures["raw"], strict=True)]
    bare_ratios = [round(o / b, 3) for o, b in zip(ours, figures["bare"], strict=True)]
    return {
        "events": events,
        "rounds": rounds,
        "events_per_s": round(statistics.median(ours)),
        "raw_events_per_s": round(statistics.median(figures["raw"])),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": ratios,
        "bare_events_per_s": round(statistics.median(figures["bare"])),
        "bare_ratio": round(statistics.median(bare_ratios), 3),
        "bare_ratios": bare_ratios,
        # This process's CPU per event (medians): what a side costs the client,
        # whatever else the machine runs; Redis's own work is not in it.
        "cpu_us_per_event": {name: round(statistics.median(v), 2) for name, v in cpu.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(run(args.events, args.rounds))
    print(
        f"GroupConsumer {result['events_per_s']:,} ev/s vs raw XREADGROUP+XACK "
        f"{result['raw_events_per_s']:,} ev/s (packed by hand "
        f"{result['bare_events_per_s']:,} ev/s) over {args.events:,} entries, "
        f"median of {args.rounds} rounds"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
