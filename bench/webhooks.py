"""Webhook throughput and latency: one worker process vs a raw httpx POST loop.

``python -m bench.webhooks [--events N] [--concurrency C] [--paced M] [--load F]``

Starts the test receiver and one ``arq workers.webhooks.WorkerSettings``
process and registers two endpoints (max_concurrency C each, told apart by
tag). Two phases, both timed from the receiver's arrival times:

- throughput: N events XADDed in one burst; deliveries_per_s is N over the
  time from the first XADD to the last arrival;
- latency: M events published one by one at a steady F x deliveries_per_s
  (default 0.5: half the measured capacity, so queueing does not dominate);
  p50_ms and p99_ms are event time to arrival at the receiver. (Latency under
  the burst is mostly time spent queued behind the burst: burst_p50_ms.)

The baseline POSTs the same bodies from C concurrent ``httpx.AsyncClient``
loops to the same receiver. worker_cpu_ms is the worker's CPU time per
delivery in the burst (Linux /proc; steadier than rates on a busy machine).
Last line: JSON with deliveries_per_s, raw_per_s, ratio, p50_ms, p99_ms and
the figures above. Needs Redis at REDIS_URL (default 127.0.0.1:6379); uses its
own prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from bus.demo.ports import free_port
from bus.events import ChainEnd, encode, new_event_id
from bus.keys import Keys, partition_of
from bus.settings import DEFAULT_REDIS_URL, Settings
from bus.webhooks.endpoints import Endpoints

ROOT = Path(__file__).resolve().parents[1]
RECEIVER = ROOT / "tests" / "support" / "webhook_receiver.py"


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


def _event(settings: Settings, i: int, tag: str) -> tuple[str, bytes]:
    trace = f"bench-{i % 64}"
    event = ChainEnd(
        id=new_event_id(), time=time.time(), run_id=trace, trace_id=trace, seq=i, tags=[tag]
    )
    return Keys(settings.prefix, settings.partitions).events(
        partition_of(trace, settings.partitions)
    ), encode(event)


def _publish(client: redis.Redis, settings: Settings, count: int) -> float:
    pipe = client.pipeline(transaction=False)
    started = time.time()
    for i in range(count):
        stream, entry = _event(settings, i, "burst")
        pipe.xadd(stream, {b"e": entry})
        if i % 100 == 99:
            pipe.execute()
    pipe.execute()
    return started


def _publish_paced(client: redis.Redis, settings: Settings, count: int, per_s: float) -> None:
    started = time.monotonic()
    for i in range(count):
        pause = started + i / per_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        stream, entry = _event(settings, i, "paced")
        client.xadd(stream, {b"e": entry})


async def _register(settings: Settings, base: str, concurrency: int) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        for name in ("burst", "paced"):
            await Endpoints(redis=client, settings=settings).add(
                f"{base}/hook/{name}",
                events=["chain.end"],
                tags=[name],
                max_concurrency=concurrency,
            )
    finally:
        await client.aclose()


def _wait_received(base: str, name: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120
    got: list[dict[str, Any]] = []
    while len(got) < count and time.monotonic() < deadline:
        time.sleep(0.25)
        got = _received(base, name)
    return got


def _latencies(got: list[dict[str, Any]]) -> list[float]:
    return sorted((r["at"] - json.loads(r["body"])["data"]["time"]) * 1000 for r in got)


def _pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(len(values) * q))], 2)


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(events: int, concurrency: int, paced: int, load: float) -> dict[str, float]:
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    prefix = f"lcbus-bench-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_url, prefix=prefix, webhook_allow_networks="127.0.0.0/8,::1/128"
    )
    port = free_port()
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
        asyncio.run(_register(settings, base, concurrency))
        worker = subprocess.Popen(
            [sys.executable, "-m", "arq", "workers.webhooks.WorkerSettings"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        time.sleep(2)  # let the worker take its partition leases
        cpu_before = _cpu_s(worker.pid)
        started = _publish(sync, settings, events)
        got = _wait_received(base, "burst", events)
        cpu_ms = (_cpu_s(worker.pid) - cpu_before) * 1000 / max(1, len(got))
        per_s = len(got) / (max(r["at"] for r in got) - started)
        burst = _latencies(got)
        _publish_paced(sync, settings, paced, per_s * load)
        latencies = _latencies(_wait_received(base, "paced", paced))
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
        "worker_cpu_ms": round(cpu_ms, 3),
        "burst_p50_ms": _pct(burst, 0.5),
        "paced_per_s": round(per_s * load, 1),
        "paced_delivered": len(latencies),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--paced", type=int, default=500, help="events in the latency phase")
    parser.add_argument("--load", type=float, default=0.5, help="paced rate / measured rate")
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.concurrency, args.paced, args.load)))


if __name__ == "__main__":
    main()
