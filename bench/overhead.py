"""What the bus handler costs the app per streamed token.

``python -m bench.overhead [--tokens N] [--repeats R]``

Streams N tokens through langchain-core's ``GenericFakeChatModel`` with sync
``.stream()`` and async ``.astream()``, under three cases interleaved in each
repeat: (a) no handler, (b) a no-op inline handler, (c) the bus handler
publishing to real Redis. The ratio (c)/(b) is the bus's own overhead, in
wall time per token (``ratio_*``) and in the process's CPU time per token, all
threads included (``cpu_ratio_*``: steadier on a busy machine). It is taken
per repeat, where (b) and (c) run back to back, and the median over the
repeats is reported: on a shared host the machine's speed drifts by tens of
percent within a minute, and a pair measured a second apart shares the
drift, where medians taken per case apart do not. With
``--thread-flusher`` a fourth case (d) runs the bus with its flusher on a
thread even under asyncio, the A/B for the loop flusher. A reference row
measures the naive design: a handler doing one synchronous HTTP POST per
event to a local receiver process.

Garbage collection: each timed stream starts right after a full collection.
A full collection of this process's heap (langchain-core and its pydantic
models) takes about 80 ms, and left to run when its counters say, it landed
in every other stream of 4,000 tokens: 20 µs more a token for whichever case
it hit, which made the sync bus case look faster than no handler at all in
every run. After a collection no stream reaches the next full one, while the
young collections a case's own allocations cause still count in its time.
The bus does not make collections more frequent (per 1,000 async tokens,
17.3 young and 1.6 middle collections with no handler, with the no-op one and
with the bus alike), so starting every case from the same point takes
nothing from it that it would cost an app.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from bench._support import REDIS_URL, median, report, throwaway_prefix
from bus import BusCallbackHandler, Settings


class NoopHandler(BaseCallbackHandler):
    """Receives every callback inline and does nothing: the fair baseline."""

    run_inline = True

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        return None

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        return None

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        return None


class NaivePostHandler(NoopHandler):
    """One synchronous HTTP POST per callback: what the bus replaces."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client()
        self.url = url

    def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
        self.client.post(self.url, json={"type": "token", "token": str(token)})


RECEIVER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def model_for(tokens: int) -> GenericFakeChatModel:
    text = " ".join(["tok"] * ((tokens + 1) // 2))  # words and spaces are both tokens
    return GenericFakeChatModel(messages=iter([AIMessage(text)] * 10_000))


Sample = tuple[float, float]
"""(wall µs per token, process CPU µs per token)."""
WALL, CPU = 0, 1


def _publishers(callbacks: list[BaseCallbackHandler]) -> list[Any]:
    return [h.publisher for h in callbacks if isinstance(h, BusCallbackHandler)]


def time_sync(tokens: int, callbacks: list[BaseCallbackHandler]) -> Sample:
    """One stream; a bus case ends when its publisher has sent everything, so that
    none of its work runs on into (and is counted in) the next case."""
    model = model_for(tokens)
    gc.collect()  # see "Garbage collection" in the module docstring
    start, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in model.stream("go", config={"callbacks": callbacks}))
    for publisher in _publishers(callbacks):
        publisher.flush(10)
    return per_token(start, cpu, count)


def time_async(tokens: int, callbacks: list[BaseCallbackHandler]) -> Sample:
    """As :func:`time_sync`; the flush waits off the loop, which keeps draining."""

    async def run() -> Sample:
        model = model_for(tokens)
        gc.collect()
        start, cpu = time.perf_counter(), time.process_time()
        count = 0
        async for _ in model.astream("go", config={"callbacks": callbacks}):
            count += 1
        for publisher in _publishers(callbacks):
            await asyncio.to_thread(publisher.flush, 10)
        return per_token(start, cpu, count)

    return asyncio.run(run())


def per_token(start: float, cpu: float, count: int) -> Sample:
    return (
        (time.perf_counter() - start) / count * 1e6,
        (time.process_time() - cpu) / count * 1e6,
    )


def naive_reference(tokens: int) -> float:
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        handler = NaivePostHandler(f"http://127.0.0.1:{port}/")
        time_sync(50, [handler])  # warm the connection
        return time_sync(tokens, [handler])[0]
    finally:
        receiver.terminate()
        receiver.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--flush-interval-ms",
        type=float,
        default=None,
        help="publisher linger (default: the setting's)",
    )
    parser.add_argument(
        "--thread-flusher",
        action="store_true",
        help="add a case publishing with the flusher on a thread under asyncio too",
    )
    args = parser.parse_args()

    with throwaway_prefix("overhead") as prefix:
        settings = Settings(redis_url=REDIS_URL, prefix=prefix)
        if args.flush_interval_ms is not None:
            settings = settings.replace(flush_interval_ms=args.flush_interval_ms)
        bus_handler = BusCallbackHandler(settings=settings)
        cases: dict[str, list[BaseCallbackHandler]] = {
            "none": [],
            "noop": [NoopHandler()],
            "bus": [bus_handler],
        }
        bus_handlers = [bus_handler]
        if args.thread_flusher:
            thread_settings = settings.replace(loop_flusher=False, prefix=f"{prefix}-thread")
            bus_handlers.append(BusCallbackHandler(settings=thread_settings))
            cases["bus_thread"] = [bus_handlers[-1]]
        runners: dict[str, Callable[[int, list[BaseCallbackHandler]], Sample]] = {
            "sync": time_sync,
            "async": time_async,
        }
        samples: dict[str, list[Sample]] = {f"{m}_{c}": [] for m in runners for c in cases}
        for runner in runners.values():  # warm-up
            for callbacks in cases.values():
                runner(200, callbacks)
        for repeat in range(args.repeats):
            for mode, runner in runners.items():
                order = list(cases.items())
                if repeat % 2:
                    order.reverse()  # no case always runs first
                for case, callbacks in order:
                    samples[f"{mode}_{case}"].append(runner(args.tokens, callbacks))
        stats = bus_handler.publisher.stats
        naive = naive_reference(min(args.tokens, 400))
        for handler in bus_handlers:
            handler.close()

    us = {name: round(median([w for w, _ in values]), 2) for name, values in samples.items()}
    cpu = {name: round(median([c for _, c in values]), 2) for name, values in samples.items()}
    for name, value in us.items():
        print(f"{name:>15}: {value:8.2f} us/token wall, {cpu[name]:8.2f} us/token CPU")
    print(f"{'naive POST':>15}: {naive:8.2f} us/token (reference: one HTTP POST per token)")
    print(f"published={stats.published} dropped={stats.dropped} errors={stats.errors}")

    def paired(mode: str, case: str, field: int) -> float:
        """The median over repeats of case/noop, each pair measured back to back."""
        ours, noop = samples[f"{mode}_{case}"], samples[f"{mode}_noop"]
        return round(median([a[field] / b[field] for a, b in zip(ours, noop, strict=True)]), 3)

    report(
        {
            "tokens": args.tokens,
            "repeats": args.repeats,
            "us_per_token": us,
            "cpu_us_per_token": cpu,
            "naive_post_us_per_token": round(naive, 2),
            "ratio_sync": paired("sync", "bus", WALL),
            "ratio_async": paired("async", "bus", WALL),
            "cpu_ratio_sync": paired("sync", "bus", CPU),
            "cpu_ratio_async": paired("async", "bus", CPU),
            **(
                {
                    "ratio_async_thread_flusher": paired("async", "bus_thread", WALL),
                    "cpu_ratio_async_thread_flusher": paired("async", "bus_thread", CPU),
                }
                if args.thread_flusher
                else {}
            ),
            "dropped": stats.dropped,
        }
    )


if __name__ == "__main__":
    main()
