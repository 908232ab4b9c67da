"""The child processes of ``bench.fanout``: SSE clients, app producers, the baseline server.

``python -m bench.fanout_procs client <result file> <url>...``: holds one SSE
client per url, prints ``connected`` per client, writes what it measured to
the result file when every stream ended.

``python -m bench.fanout_procs producer <prefix> <rate> <seconds> <run id>...``:
one app process: a BusCallbackHandler (its own publisher) streaming ``rate``
tokens/s into each of its runs once it reads ``go`` on stdin (after printing
``ready``); prints ``{"tokens", "elapsed"}`` when done.

``python -m bench.fanout_procs baseline <streams> <rate> <seconds> <clients> <port>``:
the single-process design the bus is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MARK = "~"  # token text: f"{MARK}{send_ns}" ; deltas concatenate tokens
PARTITIONS = 4
_TOKEN = re.compile(rb"~(\d+)")
_FRAME_ID = re.compile(rb"(?:^|\n)id: (\d+)-")


async def _client(url: str, out: list[int], tails: list[int]) -> None:
    """One SSE client that decodes only what the measurement needs.

    A raw HTTP/1.1 connection: the receipt time is taken once per socket read,
    complete frames (ending in a blank line) holding a text delta are scanned
    for their tokens' send times; ``tails`` gets receipt minus the time of the
    frame's history id (see ``bench.fanout_stages``). A full client library (httpx + httpx-sse
    parsing every line in Python) costs more CPU than the frontends it measures
    on a 2-core machine, and that cost would show up as latency.
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    request = (
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
    )
    writer.write(request.encode())
    reply = await reader.readuntil(b"\r\n\r\n")
    if not reply.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{url}: {reply.splitlines()[0]!r}")
    print("connected", flush=True)
    buffer = b""
    try:
        while data := await reader.read(1 << 16):
            now = time.time_ns()
            *frames, buffer = (buffer + data).split(b"\n\n")
            for frame in frames:
                if b"event: end" in frame or b"event: error" in frame or b"data: done" in frame:
                    return
                if b"content-block-delta" in frame:
                    sent = _TOKEN.findall(frame)
                    out.extend(now - int(t) for t in sent)
                    written = _FRAME_ID.search(frame)
                    if written is not None:
                        tails.extend([now - int(written[1]) * 1_000_000] * len(sent))
    finally:
        writer.close()


async def _clients_main(urls: list[str]) -> dict[str, list[int]]:
    out: list[int] = []
    tails: list[int] = []
    await asyncio.gather(*(_client(url, out, tails) for url in urls))
    return {"latencies": out, "tails": tails}


# ---------------------------------------------------------------- baseline server


def _baseline_app(streams: int, rate: float, seconds: float, expected: int) -> Any:
    from sse_starlette import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    queues: dict[int, list[asyncio.Queue[bytes | None]]] = {i: [] for i in range(streams)}
    all_connected = asyncio.Event()

    async def produce() -> None:
        await all_connected.wait()
        await _pace(streams, rate, seconds, lambda s, tok: [q.put_nowait(tok) for q in queues[s]])
        for qs in queues.values():
            for q in qs:
                q.put_nowait(None)

    async def stream(request: Request) -> EventSourceResponse:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        queues[int(request.path_params["i"])].append(queue)
        if sum(len(q) for q in queues.values()) >= expected:
            all_connected.set()

        async def frames() -> Any:
            while (token := await queue.get()) is not None:
                data = {
                    "params": {
                        "data": {"event": "content-block-delta", "delta": {"text": token.decode()}}
                    }
                }
                yield f"data: {json.dumps(data)}\n\n".encode()
            yield b"data: done\n\n"

        return EventSourceResponse(frames())

    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        task = asyncio.create_task(produce())
        yield
        task.cancel()

    return Starlette(routes=[Route("/healthz", ok), Route("/s/{i}", stream)], lifespan=lifespan)


async def _pace(
    streams: int, rate: float, seconds: float, emit: Callable[[int, bytes], object]
) -> int:
    """Emit ``rate`` tokens/s on each stream for ``seconds``; returns tokens emitted."""
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            for s in range(streams):
                emit(s, f"{MARK}{time.time_ns()}".encode())
            sent += 1
        await asyncio.sleep(0.001)
    return sent * streams


# ---------------------------------------------------------------- producer process


def _producer(prefix: str, rate: float, seconds: float, runs: list[uuid.UUID]) -> dict[str, Any]:
    from langchain_core.outputs import LLMResult

    from bus.producer.callbacks import BusCallbackHandler
    from bus.settings import Settings

    settings = Settings(redis_url=REDIS_URL, prefix=prefix, partitions=PARTITIONS)
    handler = BusCallbackHandler(settings=settings)
    for run in runs:
        handler.on_llm_start({}, ["x"], run_id=run)
    handler.publisher.flush()
    print("ready", flush=True)
    sys.stdin.readline()

    def emit(s: int, token: bytes) -> None:
        handler.on_llm_new_token(token.decode(), run_id=runs[s])

    started = time.monotonic()
    tokens = asyncio.run(_pace(len(runs), rate, seconds, emit))
    elapsed = time.monotonic() - started
    for run in runs:
        handler.on_llm_end(LLMResult(generations=[[]]), run_id=run)
    handler.close()
    return {"tokens": tokens, "elapsed": elapsed, "dropped": handler.publisher.stats.dropped}


def main() -> None:
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "client":
        Path(args[0]).write_text(json.dumps(asyncio.run(_clients_main(args[1:]))))
    elif kind == "producer":
        runs = [uuid.UUID(run) for run in args[3:]]
        print(json.dumps(_producer(args[0], float(args[1]), float(args[2]), runs)), flush=True)
    elif kind == "baseline":
        import uvicorn

        streams, rate, seconds, expected, port = args[:5]
        app = _baseline_app(int(streams), float(rate), float(seconds), int(expected))
        uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
    else:
        raise SystemExit(f"unknown process kind {kind!r}")


if __name__ == "__main__":
    main()
