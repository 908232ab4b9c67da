"""The bus on a 3-master Redis Cluster against one Redis node, in one run.

Both targets are started here from ``redis-server`` on loopback ports, without
persistence. On each: publish N events over 8 partitions (the app's
publisher: per-master pipelines on the cluster), consume them with one
GroupConsumer (no-op handler), and fan them out (the fan-out handler's
guarded history writes with live publishes, SPUBLISH on the cluster). Then
each master's share of XADD, XREADGROUP, SPUBLISH and EVALSHA calls from
``INFO commandstats``: what lets throughput grow with masters on machines
with a core per master (on a 2-core machine the processes share the cores,
so the cluster's throughput is no measure of its scaling).

    python -m bench.cluster [--events N]

The last line is JSON: per target events/s of each phase, and per command
the masters' shares and max/min.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import redis

from bench._support import report
from bus.connect import async_client
from bus.events import CustomEvent, encode
from bus.fanout.handler import FanoutHandler
from bus.keys import partition_of
from bus.producer.publisher import Publisher
from bus.runtime.consumer import Delivery, GroupConsumer
from bus.settings import Settings
from tests.support.protocol import deliveries
from tests.support.redis_cluster import OwnedCluster
from tests.support.redis_server import OwnedRedis

PARTITIONS = 8
TRACES = 400
COMMANDS = ("xadd", "xreadgroup", "spublish", "evalsha")


def _payloads(events: int) -> list[tuple[int, bytes]]:
    out = []
    for i in range(events):
        trace = f"trace-{i % TRACES}"
        event = CustomEvent(
            id=f"e{i}",
            time=time.time(),
            run_id=trace,
            trace_id=trace,
            seq=i // TRACES + 1,
            name="progress",
            data={"step": i, "note": "x" * 120},
        )
        out.append((_partition(trace), encode(event)))
    return out


def _partition(trace: str) -> int:
    return partition_of(trace, PARTITIONS)


def publish(settings: Settings, payloads: list[tuple[int, bytes]]) -> float:
    with Publisher(settings=settings.replace(buffer_size=len(payloads) + 1)) as publisher:
        # The first event connects (and on a cluster, loads the slot map): not timed.
        warm_up, rest = payloads[:1], payloads[1:]
        publisher.publish(*warm_up[0])
        assert publisher.flush(30), "publisher did not connect"
        started = time.perf_counter()
        for partition, payload in rest:
            publisher.publish(partition, payload)
        assert publisher.flush(120), "publisher did not drain"
        elapsed = time.perf_counter() - started
        assert publisher.stats.published == len(payloads), publisher.stats
    return len(rest) / elapsed


async def consume(settings: Settings, events: int) -> float:
    client = async_client(settings)
    seen = 0
    finished = asyncio.Event()

    async def handler(batch: list[Delivery]) -> None:
        nonlocal seen
        seen += len(batch)
        if seen >= events:
            finished.set()

    consumer = GroupConsumer(redis=client, settings=settings, group="bench", handler=handler)
    started = time.perf_counter()
    await consumer.start()
    await asyncio.wait_for(finished.wait(), 300)
    elapsed = time.perf_counter() - started
    await consumer.aclose()
    await client.aclose()
    return events / elapsed


async def fan_out(settings: Settings) -> float:
    client = async_client(settings)
    try:
        items = await deliveries(client, settings)
        by_partition: dict[int, list[Delivery]] = {}
        for item in items:
            by_partition.setdefault(item.partition, []).append(item)
        handler = FanoutHandler(redis=client, settings=settings)
        started = time.perf_counter()
        for batch_start in range(0, max(len(v) for v in by_partition.values()), 256):
            await asyncio.gather(
                *(
                    handler(part[batch_start : batch_start + 256])
                    for part in by_partition.values()
                    if part[batch_start : batch_start + 256]
                )
            )
        return len(items) / (time.perf_counter() - started)
    finally:
        await client.aclose()


def _reset(ports: list[int]) -> None:
    for port in ports:
        client = redis.Redis(port=port)
        client.config_resetstat()
        client.close()


def _calls(ports: list[int]) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {command: [] for command in COMMANDS}
    for port in ports:
        client = redis.Redis(port=port)
        stats: Any = client.info("commandstats")
        client.close()
        for command in COMMANDS:
            calls[command].append(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)))
    return calls


def run_target(url: str, ports: list[int], events: int) -> dict[str, Any]:
    settings = Settings(
        redis_url=url,
        prefix=f"lcbus-bench-{uuid.uuid4().hex[:8]}",
        partitions=PARTITIONS,
        fanout_coalesce_ms=0.0,
    )
    payloads = _payloads(events)
    _reset(ports)
    figures: dict[str, Any] = {"publish_per_s": round(publish(settings, payloads))}
    figures["consume_per_s"] = round(asyncio.run(consume(settings, events)))
    figures["fanout_per_s"] = round(asyncio.run(fan_out(settings)))
    figures["calls"] = _calls(ports)
    return figures


def _spread(calls: list[int]) -> float | None:
    return round(max(calls) / min(calls), 2) if calls and min(calls) > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    cluster = OwnedCluster(durable=False)
    single = OwnedRedis()
    cluster.start()
    single.start()
    try:
        one = run_target(single.url, [single.port], args.events)
        three = run_target(cluster.url, cluster.ports, args.events)
    finally:
        cluster.stop()
        single.kill()
    balance = {command: _spread(three["calls"][command]) for command in COMMANDS}
    for name, figures in (("one node", one), ("3 masters", three)):
        print(
            f"{name:>9}: publish {figures['publish_per_s']:>8,} ev/s  consume "
            f"{figures['consume_per_s']:>8,} ev/s  fan-out {figures['fanout_per_s']:>8,} ev/s"
        )
    for command in COMMANDS:
        print(
            f"  {command:<10} calls per master {three['calls'][command]}"
            f"  max/min {balance[command]}"
        )
    report(
        {
            "events": args.events,
            "partitions": PARTITIONS,
            "one_node": one,
            "cluster": three,
            "max_over_min": balance,
        }
    )


if __name__ == "__main__":
    main()
