"""Trace worker throughput and completion latency.

1. Throughput: the same entries (``--traces`` traces shaped like a chain of
   prompt | streaming chat model | parser) are put on the partitions of two
   prefixes; one ``workers.traces`` process aggregates one copy and one
   baseline worker process (``bench.noop_worker``: read, decode, acknowledge)
   consumes the other. Events/s is counted from the first entry read to the
   last acknowledged. The machine is shared, so this runs ``--rounds`` times
   with fresh copies, the one going first alternating, and the ratio is the
   median of the rounds' ratios.
2. Completion: with the trace worker idle, ``--latency-traces`` traces are
   published one by one; the time from the XADD of the root's end until
   ``GET /traces/{id}`` (Starlette app in this process) shows it completed.

    python -m bench.traces [--traces N] [--latency-traces M] [--rounds R]

Last line JSON: events_per_s, baseline_events_per_s (medians), ratio, ratios,
complete_p50_ms, complete_p99_ms.
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
import redis.asyncio as aioredis
from starlette.applications import Starlette

from bus import events as ev
from bus.keys import ENTRY_FIELD, Keys, partition_of
from bus.settings import DEFAULT_REDIS_URL, Settings
from bus.traces.api import trace_routes

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 20


def trace_events(trace_id: str, *, now: float) -> list[ev.BaseEvent]:
    """Root chain > prompt, chat model (streamed), parser: 7 + TOKENS events."""
    seq = iter(range(1, 1000))
    ids = {"prompt": f"{trace_id}-p", "model": f"{trace_id}-m", "parser": f"{trace_id}-o"}

    def make(cls: type[ev.BaseEvent], run: str, parent: str | None, **fields: Any) -> Any:
        run_type = {"prompt": "prompt", "model": "chat_model", "parser": "parser"}.get(run, "chain")
        return cls(
            id=uuid.uuid4().hex,
            time=now,
            run_id=ids.get(run, trace_id),
            trace_id=trace_id,
            seq=next(seq),
            parent_run_id=parent,
            name=run,
            run_type=run_type,
            tags=["bench"],
            metadata={"user": "u1"},
            source="bench",
            **fields,
        )

    usage = {"input_tokens": 12, "output_tokens": TOKENS, "total_tokens": 12 + TOKENS}
    return [
        make(ev.ChainStart, "root", None, inputs={"q": "question " * 10}),
        make(ev.ChainStart, "prompt", trace_id, inputs={"q": "question"}),
        make(ev.ChainEnd, "prompt", trace_id, outputs={"messages": ["question " * 10]}),
        make(ev.ChatModelStart, "model", trace_id, messages=[[{"content": "question " * 10}]]),
        *[make(ev.LLMNewToken, "model", trace_id, token=f"tok{i} ") for i in range(TOKENS)],
        make(ev.LLMEnd, "model", trace_id, text="answer " * TOKENS, usage=usage),
        make(ev.ChainStart, "parser", trace_id, inputs={"x": "answer " * TOKENS}),
        make(ev.ChainEnd, "parser", trace_id, outputs={"output": "answer " * TOKENS}),
        make(ev.ChainEnd, "root", None, outputs={"output": "answer " * TOKENS}),
    ]


async def fill(client: aioredis.Redis, settings: Settings, events: list[ev.BaseEvent]) -> None:
    keys = Keys(settings.prefix, settings.partitions)
    for start in range(0, len(events), 2000):
        async with client.pipeline(transaction=False) as pipe:
            for event in events[start : start + 2000]:
                stream = keys.events(partition_of(event.trace_id, settings.partitions))
                pipe.xadd(stream, {ENTRY_FIELD: ev.encode(event)})
            await pipe.execute()


def start_worker(settings: Settings, target: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env()}
    return subprocess.Popen(
        [sys.executable, "-m", "arq", target],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def progress(client: aioredis.Redis, settings: Settings) -> tuple[int, int]:
    """(entries read, entries still pending) of group ``traces`` over all partitions."""
    read = pending = 0
    keys = Keys(settings.prefix, settings.partitions)
    for partition in range(settings.partitions):
        try:
            groups = await client.xinfo_groups(keys.events(partition))
        except aioredis.ResponseError:
            continue
        for group in groups:
            if group["name"] == b"traces":
                read += int(group.get("entries-read") or 0)
                pending += int(group["pending"])
    return read, pending


async def throughput(client: aioredis.Redis, settings: Settings, target: str, total: int) -> float:
    process = start_worker(settings, target)
    try:
        started = None
        while True:
            read, pending = await progress(client, settings)
            if started is None and read:
                started = time.perf_counter()
            if read >= total and pending == 0:
                assert started is not None
                return total / (time.perf_counter() - started)
            if process.poll() is not None:
                raise RuntimeError(f"{target} exited with {process.returncode}")
            await asyncio.sleep(0.002)
    finally:
        process.terminate()
        process.wait(timeout=30)


async def completion_latency(client: aioredis.Redis, settings: Settings, count: int) -> list[float]:
    app = Starlette(routes=trace_routes(settings.replace(open_access=True), client))
    transport = httpx.ASGITransport(app=app)
    process = start_worker(settings, "workers.traces.WorkerSettings")
    latencies = []
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for index in range(-5, count):  # the first few warm the worker up
                trace_id = f"late-{index}"
                events = trace_events(trace_id, now=time.time())
                await fill(client, settings, events[:-1])
                await asyncio.sleep(0.01)
                ended = time.perf_counter()
                await fill(client, settings, events[-1:])
                while True:
                    reply = await http.get(f"/traces/{trace_id}")
                    if reply.status_code == 200 and reply.json()["completed"]:
                        break
                    if time.perf_counter() - ended > 30:
                        raise RuntimeError(f"{trace_id} not complete within 30 s")
                if index >= 0:
                    latencies.append((time.perf_counter() - ended) * 1000)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return latencies


async def throughputs(
    client: aioredis.Redis, ours: Settings, noop: Settings, events: list[ev.BaseEvent], index: int
) -> tuple[float, float]:
    """One round: (trace worker, baseline) events/s over fresh copies of ``events``."""
    ours = ours.replace(prefix=f"{ours.prefix}-{index}")
    noop = noop.replace(prefix=f"{noop.prefix}-{index}")
    await fill(client, ours, events)
    await fill(client, noop, events)
    aggregate = throughput(client, ours, "workers.traces.WorkerSettings", len(events))
    baseline = throughput(client, noop, "bench.noop_worker.WorkerSettings", len(events))
    if index % 2 == 0:
        base = await baseline
        return await aggregate, base
    aggregated = await aggregate
    return aggregated, await baseline


async def run(traces: int, latency_traces: int, rounds: int) -> dict[str, Any]:
    base = Settings(redis_url=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL), partitions=4)
    tag = uuid.uuid4().hex[:8]
    ours = base.replace(prefix=f"lcbus-bench-{tag}-traces")
    noop = base.replace(prefix=f"lcbus-bench-{tag}-noop")
    late = base.replace(prefix=f"lcbus-bench-{tag}-late")
    client = aioredis.Redis.from_url(base.redis_url)
    now = time.time()
    events = [e for t in range(traces) for e in trace_events(f"trace-{t}", now=now)]
    pairs: list[tuple[float, float]] = []
    try:
        for index in range(rounds):
            pairs.append(await throughputs(client, ours, noop, events, index))
        latencies = sorted(await completion_latency(client, late, latency_traces))
    finally:
        # The prefixes above are prefixes of every round's.
        for settings in (ours, noop, late):
            keys = [k async for k in client.scan_iter(match=f"{settings.prefix}*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
        await client.aclose()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    ratios = [round(aggregated / baseline, 3) for aggregated, baseline in pairs]
    return {
        "events": len(events),
        "rounds": rounds,
        "events_per_s": round(statistics.median(a for a, _ in pairs)),
        "baseline_events_per_s": round(statistics.median(b for _, b in pairs)),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": ratios,
        "complete_p50_ms": round(latencies[len(latencies) // 2], 2),
        "complete_p99_ms": round(p99, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=2000)
    parser.add_argument("--latency-traces", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.traces, args.latency_traces, args.rounds))
    print(
        f"trace worker {result['events_per_s']:,} ev/s vs consume baseline "
        f"{result['baseline_events_per_s']:,} ev/s over {result['events']:,} events "
        f"(median of {result['rounds']} rounds); "
        f"completion p50 {result['complete_p50_ms']} ms, p99 {result['complete_p99_ms']} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
