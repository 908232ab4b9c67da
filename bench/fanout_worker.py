"""Fan-out handler throughput: bus events in, protocol events in history out.

Feeds ``--streams`` concurrent model runs of ``--tokens`` tokens each (one
partition's worth, interleaved as concurrent streams arrive) to the fan-out
handler in consumer-sized batches, against the Redis at ``REDIS_URL``, under
a throwaway prefix. Compares coalescing (``--coalesce-ms``) against the same
run with coalescing off (the baseline), in wall time and in this process's
CPU time per bus event (the steadier figure on a shared machine). Last line: JSON.

    python -m bench.fanout_worker --streams 50 --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import redis.asyncio as aioredis

from bus import events as ev
from bus.fanout.handler import FanoutHandler
from bus.runtime.consumer import Delivery
from bus.runtime.resp_link import RespLink
from bus.settings import DEFAULT_REDIS_URL, Settings


def _deliveries(streams: int, tokens: int, token_gap_s: float) -> list[Delivery]:
    start = time.time()
    traces = [uuid.uuid4().hex for _ in range(streams)]
    out: list[Delivery] = []
    ms = 1

    def add(cls: type[ev.BaseEvent], trace: str, at: float, **fields: object) -> None:
        nonlocal ms
        event = cls(id=f"{trace}-{ms}", time=at, run_id=trace, trace_id=trace, seq=ms,
                    name="Model", run_type="chat_model", **fields)  # fmt: skip
        out.append(Delivery(f"{ms}-0", 0, event))  # type: ignore[arg-type]
        ms += 1

    for trace in traces:
        add(ev.ChatModelStart, trace, start)
    for i in range(tokens):
        for trace in traces:
            add(ev.LLMNewToken, trace, start + i * token_gap_s, token=f"tok{i} ")
    for trace in traces:
        add(ev.LLMEnd, trace, start + tokens * token_gap_s, text="")
    return out


async def _run(settings: Settings, items: list[Delivery], batch: int) -> tuple[float, float, int]:
    """(wall s, this process's CPU s, protocol events written)."""
    client = aioredis.Redis.from_url(settings.redis_url)
    # Its own connection, as the fan-out worker gives it (bus.fanout.worker).
    link = RespLink.for_client(client)
    handler = FanoutHandler(redis=client, settings=settings, link=link)
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for offset in range(0, len(items), batch):
            await handler(items[offset : offset + batch])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        return elapsed, cpu, handler.stats.events
    finally:
        keys = [k async for k in client.scan_iter(match=f"{settings.prefix}:*", count=1000)]
        for offset in range(0, len(keys), 500):
            await client.delete(*keys[offset : offset + 500])
        if link is not None:
            link.close()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256, help="entries per handler call")
    parser.add_argument("--token-gap-ms", type=float, default=1.0, help="per stream")
    parser.add_argument("--coalesce-ms", type=float, default=5.0)
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    items = _deliveries(args.streams, args.tokens, args.token_gap_ms / 1000)
    results = {}
    for label, window in (("baseline", 0.0), ("coalesced", args.coalesce_ms)):
        settings = Settings(redis_url=url, prefix=f"lcbus-bench-{uuid.uuid4().hex[:8]}",
                            fanout_coalesce_ms=window)  # fmt: skip
        elapsed, cpu, written = asyncio.run(_run(settings, items, args.batch))
        results[label] = (elapsed, cpu, written)
        print(f"{label:>9}: {len(items)} bus events -> {written} protocol events "
              f"in {elapsed:.3f} s ({len(items) / elapsed:,.0f} bus events/s, "
              f"{cpu / len(items) * 1e6:.1f} us CPU each)")  # fmt: skip
    base, merged = results["baseline"], results["coalesced"]
    print(json.dumps({
        "bus_events": len(items),
        "streams": args.streams,
        "batch": args.batch,
        "baseline_events_per_s": round(len(items) / base[0]),
        "baseline_cpu_us_per_event": round(base[1] / len(items) * 1e6, 2),
        "baseline_protocol_events": base[2],
        "coalesced_events_per_s": round(len(items) / merged[0]),
        "coalesced_cpu_us_per_event": round(merged[1] / len(items) * 1e6, 2),
        "coalesced_protocol_events": merged[2],
        "coalesce_ms": args.coalesce_ms,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
