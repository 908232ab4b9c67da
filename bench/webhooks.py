"""Webhook throughput and latency: one worker process vs a raw httpx POST loop.

``python -m bench.webhooks [--events N] [--concurrency C]``

Starts the test receiver and one ``arq workers.webhooks.WorkerSettings``
process, registers one endpoint (max_concurrency C), XADDs N events and
measures, from the receiver's arrival times, deliveries per second and
event-to-receipt latency (event time to arrival). The baseline POSTs the
same bodies from C concurrent ``httpx.AsyncClient`` loops to the same
receiver. Last line: JSON with deliveries_per_s, raw_per_s, ratio, p50_ms,
p99_ms. Needs Redis at REDIS_URL (default 127.0.0.1:6379); uses its own prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from bus.endpoints import Endpoints
from bus.events import ChainEnd, encode, new_event_id
from bus.keys import Keys, partition_of
from bus.settings import DEFAULT_REDIS_URL, Settings

ROOT = Path(__file__).resolve().parents[1]
RECEIVER = ROOT / "tests" / "support" / "webhook_receiver.py"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url, timeout=2).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _raw(url: str, bodies: list[bytes], concurrency: int) -> float:
    queue = list(reversed(bodies))
    async with httpx.AsyncClient(timeout=15) as client:

        async def loop() -> None:
            while queue:
                (await client.post(url, content=queue.pop())).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


def _received(base: str, name: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = httpx.get(f"{base}/received/{name}", timeout=30).json()
    return got


def _publish(client: redis.Redis, settings: Settings, count: int) -> float:
    keys = Keys(settings.prefix)
    pipe = client.pipeline(transaction=False)
    started = time.time()
    for i in range(count):
        trace = f"bench-{i % 64}"
        event = ChainEnd(id=new_event_id(), time=time.time(), run_id=trace, trace_id=trace, seq=i)
        pipe.xadd(keys.events(partition_of(trace, settings.partitions)), {b"e": encode(event)})
        if i % 100 == 99:
            pipe.execute()
    pipe.execute()
    return started


async def _register(settings: Settings, url: str, concurrency: int) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await Endpoints(redis=client, settings=settings).add(
            url, events=["chain.end"], max_concurrency=concurrency
        )
    finally:
        await client.aclose()


def run(events: int, concurrency: int) -> dict[str, float]:
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    prefix = f"lcbus-bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url, prefix=prefix, webhook_allow_networks="127.0.0.0/8,::1/128"
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LCBUS_REDIS_URL": redis_url,
        "LCBUS_PREFIX": prefix,
        "LCBUS_WEBHOOK_ALLOW_NETWORKS": settings.webhook_allow_networks,
    }
    receiver = subprocess.Popen([sys.executable, str(RECEIVER), str(port)], cwd=ROOT)
    worker = None
    sync = redis.Redis.from_url(redis_url)
    log = open(os.environ.get("BENCH_WORKER_LOG", os.devnull), "ab")  # noqa: SIM115
    try:
        _wait_http(base + "/health")
        asyncio.run(_register(settings, f"{base}/hook/bus", concurrency))
        worker = subprocess.Popen(
            [sys.executable, "-m", "arq", "workers.webhooks.WorkerSettings"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        time.sleep(2)  # let the worker take its partition leases
        started = _publish(sync, settings, events)
        deadline = time.monotonic() + 120
        got: list[dict[str, Any]] = []
        while len(got) < events and time.monotonic() < deadline:
            time.sleep(0.25)
            got = _received(base, "bus")
        arrivals = [r["at"] for r in got]
        latencies = sorted((r["at"] - json.loads(r["body"])["data"]["time"]) * 1000 for r in got)
        per_s = len(got) / (max(arrivals) - started)
        bodies = [r["body"].encode() for r in got]
        raw_per_s = asyncio.run(_raw(f"{base}/hook/raw", bodies, concurrency))
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        receiver.terminate()
        receiver.wait()
        log.close()
        for key in sync.scan_iter(match=f"{prefix}:*", count=1000):
            sync.delete(key)
        sync.close()
    return {
        "events": events,
        "delivered": len(got),
        "deliveries_per_s": round(per_s, 1),
        "raw_per_s": round(raw_per_s, 1),
        "ratio": round(per_s / raw_per_s, 3),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.concurrency)))


if __name__ == "__main__":
    main()
