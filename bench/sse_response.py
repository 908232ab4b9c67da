"""What one SSE stream's response costs: the frontend's own against sse-starlette's.

``streams`` responses run behind a no-op ASGI ``send`` (no server, no socket),
each fed by a queue; ``chunks`` rounds then put one frame on every queue. It
measures what the response adds per stream (memory held by an open stream,
traced with ``tracemalloc``) and per chunk (CPU from the queue's wakeup to the
send returning). Baseline, same run: sse-starlette's ``EventSourceResponse``
(four tasks per stream in an anyio task group, a cancel scope per send), which
the frontend used before ``bus.frontend.event_stream``. Floor: a bare loop
that awaits the queue and sends. ``python -m bench.sse_response [--streams
1000 --chunks 20]``; last line JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench._support import report

FRAME = b"id: 1700000000000-0\ndata: " + b"x" * 160 + b"\n\n"
Kind = Callable[[AsyncIterator[bytes], Any, Any, Any], Awaitable[None]]


class _Round:
    """Chunks still to be sent in this round, over every stream."""

    def __init__(self) -> None:
        self.left = 0
        self.done = asyncio.Event()

    def start(self, chunks: int) -> None:
        self.left = chunks
        self.done.clear()

    def sent(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


class _Connection:
    """The ASGI side of one client: counts what is sent; disconnects when told."""

    def __init__(self, round_: _Round) -> None:
        self.gone = asyncio.Event()
        self.sent = 0
        self._round = round_

    async def send(self, message: dict[str, Any]) -> None:
        body = message.get("body", b"")
        if body:
            self.sent += len(body)
            self._round.sent()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def _frames(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (frame := await queue.get()) is not None:
        yield frame


async def _ours(frames: AsyncIterator[bytes], scope: Any, receive: Any, send: Any) -> None:
    from bus.frontend.event_stream import EventStreamResponse

    await EventStreamResponse(frames, ping_s=15, send_timeout_s=30)(scope, receive, send)


async def _sse_starlette(frames: AsyncIterator[bytes], scope: Any, receive: Any, send: Any) -> None:
    from sse_starlette import EventSourceResponse

    await EventSourceResponse(frames, ping=15, send_timeout=30)(scope, receive, send)


async def _floor(frames: AsyncIterator[bytes], scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    async for frame in frames:
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _measure(kind: Kind, streams: int, chunks: int) -> tuple[float, float]:
    """(KiB held per open stream, microseconds of CPU per chunk)."""
    round_ = _Round()
    conns = [_Connection(round_) for _ in range(streams)]
    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue() for _ in range(streams)]
    scope = {"type": "http", "method": "GET"}
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [
        asyncio.ensure_future(kind(_frames(q), scope, c.receive, c.send))
        for q, c in zip(queues, conns, strict=True)
    ]
    await asyncio.sleep(0.05)  # every stream open and waiting
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    cpu = time.process_time()
    for _ in range(chunks):
        round_.start(streams)
        for queue in queues:
            queue.put_nowait(FRAME)
        await round_.done.wait()
    cpu = time.process_time() - cpu
    for queue in queues:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    if any(c.sent != chunks * len(FRAME) for c in conns):
        raise RuntimeError(f"{kind.__name__}: a stream did not send every chunk")
    return held / streams / 1024, cpu / (streams * chunks) * 1e6


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    kinds: dict[str, Kind] = {"ours": _ours, "sse_starlette": _sse_starlette, "floor": _floor}
    await _measure(_ours, 10, 2)  # imports, first-call caches: out of the figures
    await _measure(_sse_starlette, 10, 2)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    for _ in range(args.repeat):
        for name, kind in kinds.items():
            figures[name].append(await _measure(kind, args.streams, args.chunks))
    out: dict[str, Any] = {"streams": args.streams, "chunks": args.chunks}
    for name, runs in figures.items():
        prefix = "" if name == "ours" else f"{name}_"
        out[f"{prefix}kib_per_stream"] = round(statistics.median(r[0] for r in runs), 1)
        out[f"{prefix}us_per_chunk"] = round(statistics.median(r[1] for r in runs), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the frontend extra installs it
        out = asyncio.run(_run(args))
    else:
        out = uvloop.run(_run(args))
    report(out)


if __name__ == "__main__":
    main()
