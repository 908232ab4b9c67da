"""What the bus handler costs a real ChatOpenAI app, in the app's own CPU time.

``python -m bench.openai_overhead [--concurrency 1,10,100] [--words N] [--repeats R]``

``langchain-openai``'s ``ChatOpenAI`` streams over real HTTP (SSE) from the
scripted OpenAI-compatible server of the demo (``bus.demo.openai_server``),
which runs in a process of its own so that only the app's CPU is counted.
For each concurrency level the app runs that many ``astream`` calls at once
on one event loop, with no callback handler (the baseline) and with the bus
handler publishing to real Redis, interleaved in each repeat. A sample is
the app process's CPU time (``time.process_time``: every thread, the
publisher's included, until its buffer is sent) divided by the tokens
streamed. The ratio with/without is the overhead a user pays in their own
process.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_openai import ChatOpenAI

from bench._support import REDIS_URL, median, report, throwaway_prefix
from bus import BusCallbackHandler, Publisher, Settings
from bus.demo.ports import free_port
from tests.support.processes import spawn, wait_http

SERVER = """
import sys, uvicorn
from bus.demo.openai_server import create_app
port, words, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
answer = " ".join(f"word{i}" for i in range(words))
uvicorn.run(create_app(answer=answer, delay_s=delay), host="127.0.0.1", port=port,
            log_level="warning", access_log=False)
"""


def start_server(words: int, delay_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = spawn(["-c", SERVER, str(port), str(words), str(delay_s)])
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return server, f"http://127.0.0.1:{port}/v1"


async def stream_once(model: ChatOpenAI, callbacks: list[BaseCallbackHandler]) -> int:
    tokens = 0
    async for chunk in model.astream("Tell me about Redis", config={"callbacks": callbacks}):
        tokens += bool(chunk.content)
    return tokens


async def sent(publisher: Publisher | None, within_s: float = 10.0) -> None:
    """Wait (inside the timed span) until the publisher has sent what it was given."""
    for _ in range(int(within_s * 1000)):
        if publisher is None or not (publisher.stats.buffer_depth or publisher._loop_in_flight()):
            return
        await asyncio.sleep(0.001)


async def sample(
    model: ChatOpenAI, concurrency: int, rounds: int, handler: BusCallbackHandler | None
) -> tuple[float, float, int]:
    """(CPU µs per token, wall µs per token, tokens) for ``rounds`` x ``concurrency`` streams."""
    callbacks: list[BaseCallbackHandler] = [handler] if handler is not None else []
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for _ in range(rounds):
        counts = await asyncio.gather(*(stream_once(model, callbacks) for _ in range(concurrency)))
        tokens += sum(counts)
    await sent(handler.publisher if handler is not None else None)
    cpu_us = (time.process_time() - cpu) / tokens * 1e6
    wall_us = (time.perf_counter() - start) / tokens * 1e6
    return cpu_us, wall_us, tokens


async def measure(
    base_url: str, levels: list[int], repeats: int, handler: BusCallbackHandler
) -> dict[str, Any]:
    model = ChatOpenAI(base_url=base_url, api_key="unused", model="scripted", max_retries=3)
    for case in (None, handler):  # warm up the HTTP pool, the imports and the publisher
        await sample(model, 2, 1, case)
    figures: dict[str, Any] = {}
    for concurrency in levels:
        rounds = max(1, 10 // concurrency)
        runs: dict[str, list[tuple[float, float, int]]] = {"without": [], "with": []}
        for repeat in range(repeats):
            order = [("without", None), ("with", handler)]
            if repeat % 2:
                order.reverse()  # no case always runs first
            for name, case in order:
                runs[name].append(await sample(model, concurrency, rounds, case))
        without = median([cpu for cpu, _, _ in runs["without"]])
        with_bus = median([cpu for cpu, _, _ in runs["with"]])
        figures[str(concurrency)] = {
            "cpu_us_per_token_without": round(without, 2),
            "cpu_us_per_token_with": round(with_bus, 2),
            "ratio": round(with_bus / without, 3),
            "wall_us_per_token_without": round(median([w for _, w, _ in runs["without"]]), 2),
            "wall_us_per_token_with": round(median([w for _, w, _ in runs["with"]]), 2),
            "tokens_per_sample": runs["with"][0][2],
        }
        print(f"concurrency {concurrency:>3}: {figures[str(concurrency)]}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="1,10,100", help="comma-separated levels")
    parser.add_argument("--words", type=int, default=200, help="tokens per streamed answer")
    parser.add_argument("--delay", type=float, default=0.001, help="server's seconds per token")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    server, base_url = start_server(args.words, args.delay)
    try:
        with throwaway_prefix("openai-overhead") as prefix:
            handler = BusCallbackHandler(settings=Settings(redis_url=REDIS_URL, prefix=prefix))
            figures = asyncio.run(measure(base_url, levels, args.repeats, handler))
            stats = handler.publisher.stats
            handler.close()
    finally:
        server.terminate()
        server.wait()
    report(
        {
            "words": args.words,
            "server_delay_s": args.delay,
            "repeats": args.repeats,
            "concurrency": figures,
            "published": stats.published,
            "dropped": stats.dropped,
        }
    )


if __name__ == "__main__":
    main()
