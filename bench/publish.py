"""Sustained publishing throughput of one process.

``python -m bench.publish [--events N] [--repeats R]``

Pushes N pre-encoded events through :class:`bus.Publisher` into real Redis
and, in the same run, the same payloads through a raw redis-py pipelined
``XADD`` loop (the baseline: what the publisher does minus buffering,
batching decisions and bookkeeping). Repeats alternate the two.
"""

from __future__ import annotations

import argparse
import time

import redis

from bench._support import REDIS_URL, median, report, throwaway_prefix
from bus import Keys, Publisher, Settings, encode
from bus import events as ev
from bus.keys import ENTRY_FIELD


def payloads(count: int) -> list[bytes]:
    return [
        encode(
            ev.LLMNewToken(
                id=ev.new_event_id(),
                time=time.time(),
                run_id="0190c0de-0000-7000-8000-000000000001",
                trace_id="0190c0de-0000-7000-8000-000000000001",
                seq=i,
                name="ChatOpenAI",
                run_type="chat_model",
                token=" token",
            )
        )
        for i in range(count)
    ]


def run_publisher(settings: Settings, data: list[bytes]) -> float:
    publisher = Publisher(settings=settings)
    start = time.perf_counter()
    for payload in data:
        publisher.publish(0, payload)
    if not publisher.flush(120):
        raise RuntimeError("publisher did not drain")
    elapsed = time.perf_counter() - start
    stats = publisher.stats
    publisher.close()
    if stats.dropped or stats.published != len(data):
        raise RuntimeError(f"lost events: {stats}")
    return len(data) / elapsed


def run_raw(settings: Settings, data: list[bytes], batch: int) -> float:
    client = redis.Redis.from_url(settings.redis_url)
    key = Keys(settings.prefix).events(0)
    start = time.perf_counter()
    for offset in range(0, len(data), batch):
        with client.pipeline(transaction=False) as pipe:
            for payload in data[offset : offset + batch]:
                pipe.xadd(
                    key, {ENTRY_FIELD: payload}, maxlen=settings.stream_maxlen, approximate=True
                )
            pipe.execute()
    elapsed = time.perf_counter() - start
    client.close()
    return len(data) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = payloads(args.events)
    ours: list[float] = []
    raw: list[float] = []
    with throwaway_prefix("publish") as prefix:
        # The buffer holds the whole burst: this measures throughput, not the drop policy.
        settings = Settings(
            redis_url=REDIS_URL, prefix=prefix, partitions=1, buffer_size=args.events
        )
        client = redis.Redis.from_url(REDIS_URL)
        for _ in range(args.repeats):
            client.delete(Keys(prefix).events(0))
            raw.append(run_raw(settings, data, settings.batch_size))
            client.delete(Keys(prefix).events(0))
            ours.append(run_publisher(settings, data))
        client.close()
    events_per_s, raw_per_s = median(ours), median(raw)
    print(
        f"publisher: {events_per_s:,.0f} events/s   raw pipelined XADD: {raw_per_s:,.0f} events/s"
    )
    print(f"payload {len(data[0])} bytes, {args.events} events x {args.repeats} repeats")
    report(
        {
            "events": args.events,
            "payload_bytes": len(data[0]),
            "events_per_s": round(events_per_s),
            "raw_events_per_s": round(raw_per_s),
            "ratio": round(events_per_s / raw_per_s, 3),
        }
    )


if __name__ == "__main__":
    main()
