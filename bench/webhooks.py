"""Webhook throughput and latency: one worker process vs a raw httpx POST loop.

``python -m bench.webhooks [--events N] [--concurrency C] [--rounds R] [--paced M] [--load F]``

Starts the test receiver and one ``arq workers.webhooks.WorkerSettings``
process and registers an endpoint per round and one for the latency phase
(max_concurrency C each, told apart by tag). Both phases are timed from the
receiver's arrival times:

- throughput, R rounds: each round XADDs N events in one burst for its own
  endpoint (deliveries_per_s is N over the time from the first XADD to the
  last arrival), then POSTs the same bodies from the baseline loop. A
  round's ratio compares the two measured back to back, so that the
  machine's speed, which drifts by tens of percent within minutes on a
  shared host, moves both sides of it alike; the figures reported are the
  rounds' medians (and each round in ``rounds``);
- latency: M events published one by one at a steady F x deliveries_per_s
  (default 0.5: half the measured capacity, so queueing does not dominate);
  p50_ms and p99_ms are event time to arrival at the receiver. (Latency under
  a burst is mostly time spent queued behind it: burst_p50_ms.)

The baseline POSTs the bodies from C concurrent ``httpx.AsyncClient`` loops
to the same receiver. worker_cpu_ms is the worker's CPU time per delivery in
a burst (Linux /proc; steadier than rates on a busy machine). Last line: JSON
with deliveries_per_s, raw_per_s, ratio, p50_ms, p99_ms and the figures
above. Needs Redis at REDIS_URL (default 127.0.0.1:6379); uses its own prefix.
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
from dataclasses import dataclass
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


def _publish(client: redis.Redis, settings: Settings, count: int, tag: str) -> float:
    pipe = client.pipeline(transaction=False)
    started = time.time()
    for i in range(count):
        stream, entry = _event(settings, i, tag)
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


async def _register(settings: Settings, base: str, concurrency: int, names: list[str]) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        for name in names:
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


@dataclass(frozen=True, slots=True)
class Round:
    """One burst through the worker, and the baseline loop right after it."""

    deliveries_per_s: float
    raw_per_s: float
    worker_cpu_ms: float
    latencies: list[float]

    @property
    def ratio(self) -> float:
        return self.deliveries_per_s / self.raw_per_s

    def summary(self) -> dict[str, float]:
        return {
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "raw_per_s": round(self.raw_per_s, 1),
            "ratio": round(self.ratio, 3),
            "worker_cpu_ms": round(self.worker_cpu_ms, 3),
        }


def _round(
    sync: redis.Redis,
    settings: Settings,
    base: str,
    worker_pid: int,
    name: str,
    args: argparse.Namespace,
) -> Round:
    cpu_before = _cpu_s(worker_pid)
    started = _publish(sync, settings, args.events, name)
    got = _wait_received(base, name, args.events)
    if len(got) < args.events:
        raise RuntimeError(f"{name}: {len(got)} of {args.events} deliveries arrived")
    cpu_ms = (_cpu_s(worker_pid) - cpu_before) * 1000 / len(got)
    per_s = len(got) / (max(r["at"] for r in got) - started)
    bodies = [r["body"].encode() for r in got]
    raw_per_s = asyncio.run(_raw(f"{base}/hook/raw", bodies, args.concurrency))
    return Round(per_s, raw_per_s, cpu_ms, _latencies(got))


def run(args: argparse.Namespace) -> dict[str, Any]:
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
    bursts = [f"burst{i}" for i in range(args.rounds)]
    receiver = subprocess.Popen([sys.executable, str(RECEIVER), str(port)], cwd=ROOT)
    worker = None
    sync = redis.Redis.from_url(redis_url)
    log = open(os.environ.get("BENCH_WORKER_LOG", os.devnull), "ab")  # noqa: SIM115
    try:
        _wait_http(base + "/health")
        asyncio.run(_register(settings, base, args.concurrency, [*bursts, "paced"]))
        worker = subprocess.Popen(
            [sys.executable, "-m", "arq", "workers.webhooks.WorkerSettings"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        time.sleep(2)  # let the worker take its partition leases
        rounds = [_round(sync, settings, base, worker.pid, name, args) for name in bursts]
        per_s = statistics.median(r.deliveries_per_s for r in rounds)
        _publish_paced(sync, settings, args.paced, per_s * args.load)
        latencies = _latencies(_wait_received(base, "paced", args.paced))
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
    burst = sorted(ms for r in rounds for ms in r.latencies)
    return {
        "events": args.events,
        "rounds": [r.summary() for r in rounds],
        "deliveries_per_s": round(per_s, 1),
        "raw_per_s": round(statistics.median(r.raw_per_s for r in rounds), 1),
        "ratio": round(statistics.median(r.ratio for r in rounds), 3),
        "worker_cpu_ms": round(statistics.median(r.worker_cpu_ms for r in rounds), 3),
        "burst_p50_ms": _pct(burst, 0.5),
        "paced_per_s": round(per_s * args.load, 1),
        "paced_delivered": len(latencies),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="bursts, each with its baseline")
    parser.add_argument("--paced", type=int, default=500, help="events in the latency phase")
    parser.add_argument("--load", type=float, default=0.5, help="paced rate / measured rate")
    args = parser.parse_args()
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
