"""The demo's embedded Redis vs fakeredis' own TCP server: how soon an entry or a message arrives.

Both servers run in a child process each, in the same run. Like the demo's
workers, 24 readers (3 groups x 8 partition streams) read; an entry is added
to one stream every 10 ms, and the time until its group's reader on that
stream has it is measured. On fakeredis' server the readers poll (its blocking
``XREADGROUP`` answers empty), pausing 50 ms after an empty read as
``bus.runtime.reader`` does; on the embedded server they block. Then a message
is published every 10 ms and the time until a subscriber has it is measured.

    python -m bench.embedded [--samples N]

The last line is JSON: per server, entry_p50_ms / entry_p99_ms and
message_p50_ms / message_p99_ms; and the ratios stock / embedded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import redis

from bus.demo.embedded import EmbeddedRedis
from bus.runtime.reader import IDLE_SLEEP_S

GROUPS = 3
STREAMS = 8
GAP_S = 0.01

_STOCK = (
    "from fakeredis import TcpFakeServer\n"
    "server = TcpFakeServer(('127.0.0.1', 0), server_version=(7, 4))\n"
    "server.daemon_threads = True\n"
    "print(f'redis://127.0.0.1:{server.server_address[1]}/0', flush=True)\n"
    "server.serve_forever()\n"
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 2)


def _reader(url: str, group: int, stream: int, block: bool, seen: Callable[[bytes], None]) -> None:
    client = redis.Redis.from_url(url)
    try:
        while True:
            reply = client.xreadgroup(
                f"g{group}", "c", {f"s{stream}": ">"}, count=100, block=1000 if block else None
            )
            entries = reply[0][1] if reply else []
            for _, fields in entries:
                seen(fields[b"k"])
            if not entries and not block:
                time.sleep(IDLE_SLEEP_S)
    except redis.ConnectionError:
        return  # the server stopped


def entry_latencies(url: str, samples: int, *, block: bool) -> list[float]:
    writer = redis.Redis.from_url(url)
    for stream in range(STREAMS):
        for group in range(GROUPS):
            writer.xgroup_create(f"s{stream}", f"g{group}", id="$", mkstream=True)
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    arrived = threading.Event()

    def seen(key: bytes) -> None:
        latencies.append(time.perf_counter() - sent[key])
        arrived.set()

    for stream in range(STREAMS):
        for group in range(GROUPS):
            # Only group 0 of stream 0 reports: the others are the idle load.
            report = seen if (stream, group) == (0, 0) else (lambda key: None)
            args = (url, group, stream, block, report)
            threading.Thread(target=_reader, args=args, daemon=True).start()
    time.sleep(0.5)
    for index in range(samples):
        key = b"%d" % index
        arrived.clear()
        sent[key] = time.perf_counter()
        writer.xadd("s0", {"k": key})
        arrived.wait(5)
        time.sleep(GAP_S)
    writer.close()
    return latencies


def message_latencies(url: str, samples: int) -> list[float]:
    publisher = redis.Redis.from_url(url)
    subscriber = redis.Redis.from_url(url).pubsub()
    subscriber.subscribe("live")
    subscriber.get_message(timeout=5)
    latencies = []
    for index in range(samples):
        started = time.perf_counter()
        publisher.publish("live", b"%d" % index)
        message = subscriber.get_message(timeout=5)
        if message is not None:
            latencies.append(time.perf_counter() - started)
        time.sleep(GAP_S)
    subscriber.close()
    publisher.close()
    return latencies


def measure(url: str, samples: int, *, block: bool) -> dict[str, float]:
    entries = entry_latencies(url, samples, block=block)
    messages = message_latencies(url, samples)
    return {
        "entry_p50_ms": _percentile(entries, 0.5),
        "entry_p99_ms": _percentile(entries, 0.99),
        "message_p50_ms": _percentile(messages, 0.5),
        "message_p99_ms": _percentile(messages, 0.99),
    }


def stock_server() -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen([sys.executable, "-c", _STOCK], stdout=subprocess.PIPE)
    assert process.stdout is not None
    return process, process.stdout.readline().decode().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    process, url = stock_server()
    try:
        stock = measure(url, args.samples, block=False)
    finally:
        process.terminate()
        process.wait()
    with EmbeddedRedis() as url:
        embedded = measure(url, args.samples, block=True)
    print(f"fakeredis TcpFakeServer, polling  {stock}")
    print(f"embedded server, blocking         {embedded}")
    result = {
        "samples": args.samples,
        "stock": stock,
        "embedded": embedded,
        "entry_p50_ratio": round(stock["entry_p50_ms"] / max(embedded["entry_p50_ms"], 1e-3), 1),
        "message_p50_ratio": round(
            stock["message_p50_ms"] / max(embedded["message_p50_ms"], 1e-3), 1
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
