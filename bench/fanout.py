"""End-to-end streaming latency: handler call in the app -> receipt by SSE clients.

Bus run: this process is the app (BusCallbackHandler, ``streams`` concurrent LLM
runs, ``rate`` tokens/s each); a fan-out worker (arq, from its command line)
and two frontend processes (``lcbus serve``) run beside it; a client process
holds ``clients_per_stream`` SSE clients per stream, split across the two
frontends. Each token carries its send time (``time.time_ns()`` at the handler
call); the client process records receipt minus send for every token (a
coalesced delta carries several tokens).

Baseline, same run and same client process: a single-process design, where
the handler is ``asyncio.Queue.put_nowait`` per client and an SSE endpoint
reads the queue (``--baseline-server``).

Then a short sweep of higher loads (4 s each) reports the highest tokens/s,
the main run included, whose p99 stays under 50 ms. The client process reads
the SSE streams with a minimal raw-socket parser (see ``_client``).
``python -m bench.fanout [--streams 10 --rate 500 --clients-per-stream 2
--seconds 8 --sweep 10000,15000,20000,30000]``; last line JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MARK = "~"  # token text: f"{MARK}{send_ns}" ; deltas concatenate tokens
_TOKEN = re.compile(rb"~(\d+)")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(prefix: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LCBUS_REDIS_URL": REDIS_URL,
        "LCBUS_PREFIX": prefix,
        "LCBUS_OPEN_ACCESS": "1",
        "LCBUS_PARTITIONS": "4",
    }


def _wait_http(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def _processes(
    cmds: list[list[str]], env: dict[str, str]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for cmd in cmds
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---------------------------------------------------------------- client process


async def _client(url: str, out: list[int]) -> None:
    """One SSE client that decodes only what the measurement needs.

    A raw HTTP/1.1 connection: the receipt time is taken once per socket read,
    complete frames (ending in a blank line) holding a text delta are scanned
    for their tokens' send times. A full client library (httpx + httpx-sse
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
                    out.extend(now - int(sent) for sent in _TOKEN.findall(frame))
    finally:
        writer.close()


async def _clients_main(urls: list[str]) -> list[int]:
    out: list[int] = []
    await asyncio.gather(*(_client(url, out) for url in urls))
    return out


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


async def _pace(streams: int, rate: float, seconds: float, emit: Any) -> int:
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


# ---------------------------------------------------------------- runs


def _run_clients(urls: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    result = f"/tmp/lcbus-bench-fanout-{uuid.uuid4().hex}.json"
    cmd = [sys.executable, "-m", "bench.fanout", "--client-process", result, *urls]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for _ in urls:
        proc.stdout.readline()
    return proc, result


def _collect(proc: subprocess.Popen[bytes], result: str) -> list[int]:
    proc.wait(timeout=120)
    latencies: list[int] = json.loads(Path(result).read_text())
    Path(result).unlink()
    return latencies


def run_bus(streams: int, rate: float, per_stream: int, seconds: float) -> dict[str, Any]:
    from langchain_core.outputs import LLMResult

    from bus.producer.callbacks import BusCallbackHandler
    from bus.settings import Settings

    prefix = f"lcbus-bench-{uuid.uuid4().hex[:8]}"
    env = _env(prefix)
    ports = [_free_port(), _free_port()]
    serve = [
        [sys.executable, "-m", "bus.cli", "serve", "--port", str(p), "--log-level", "warning"]
        for p in ports
    ]
    worker = [sys.executable, "-m", "arq", "workers.fanout.WorkerSettings"]
    try:
        with _processes([*serve, worker], env):
            for port in ports:
                _wait_http(f"http://127.0.0.1:{port}/healthz")
            runs = [uuid.uuid4() for _ in range(streams)]
            urls = [
                f"http://127.0.0.1:{ports[c % 2]}/traces/{run}/stream"
                for run in runs
                for c in range(per_stream)
            ]
            clients, result = _run_clients(urls, env)
            handler = BusCallbackHandler(
                settings=Settings(redis_url=REDIS_URL, prefix=prefix, partitions=4)
            )
            for run in runs:
                handler.on_llm_start({}, ["x"], run_id=run)

            def emit(s: int, token: bytes) -> None:
                handler.on_llm_new_token(token.decode(), run_id=runs[s])

            t0 = time.monotonic()
            tokens = asyncio.run(_pace(streams, rate, seconds, emit))
            elapsed = time.monotonic() - t0
            for run in runs:
                handler.on_llm_end(LLMResult(generations=[[]]), run_id=run)
            handler.close()
            latencies = _collect(clients, result)
    finally:
        _delete_prefix(prefix)
    return _summary(latencies, tokens, elapsed, streams, len(urls))


def run_baseline(streams: int, rate: float, per_stream: int, seconds: float) -> dict[str, Any]:
    port = _free_port()
    env = _env("unused")
    args = [str(streams), str(rate), str(seconds), str(streams * per_stream), str(port)]
    with _processes([[sys.executable, "-m", "bench.fanout", "--baseline-server", *args]], env):
        _wait_http(f"http://127.0.0.1:{port}/healthz")
        urls = [f"http://127.0.0.1:{port}/s/{s}" for s in range(streams) for _ in range(per_stream)]
        t0 = time.monotonic()
        clients, result = _run_clients(urls, env)
        latencies = _collect(clients, result)
        elapsed = time.monotonic() - t0
    tokens = len(latencies) // max(per_stream, 1)
    return _summary(latencies, tokens, elapsed, streams, len(urls))


def _summary(
    lat: list[int], tokens: int, elapsed: float, streams: int, clients: int
) -> dict[str, Any]:
    lat.sort()

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 2) if lat else float("nan")

    return {
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "tokens_per_s": round(tokens / elapsed),
        "deliveries_per_s": round(len(lat) / elapsed),
        "streams": streams,
        "clients": clients,
        "received": len(lat),
    }


def _delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


def main() -> None:
    if sys.argv[1:2] == ["--client-process"]:
        Path(sys.argv[2]).write_text(json.dumps(asyncio.run(_clients_main(sys.argv[3:]))))
        return
    if sys.argv[1:2] == ["--baseline-server"]:
        import uvicorn

        streams, rate, seconds, expected, port = sys.argv[2:7]
        app = _baseline_app(int(streams), float(rate), float(seconds), int(expected))
        uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--rate", type=float, default=500.0, help="tokens/s per stream")
    parser.add_argument("--clients-per-stream", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--sweep", default="10000,15000,20000,30000", help="streams*rate loads (tokens/s)"
    )
    args = parser.parse_args()

    base = run_baseline(args.streams, args.rate, args.clients_per_stream, args.seconds)
    print("baseline", json.dumps(base), flush=True)
    bus = run_bus(args.streams, args.rate, args.clients_per_stream, args.seconds)
    print("bus", json.dumps(bus), flush=True)
    best = bus["tokens_per_s"] if bus["p99_ms"] < 50 else None
    for load in (int(x) for x in args.sweep.split(",") if x):
        rate = load / args.streams
        step = run_bus(args.streams, rate, args.clients_per_stream, 4.0)
        print("sweep", json.dumps(step), flush=True)
        if step["p99_ms"] < 50 and (best is None or step["tokens_per_s"] > best):
            best = step["tokens_per_s"]
    final = {
        **{
            k: bus[k]
            for k in ("p50_ms", "p99_ms", "tokens_per_s", "deliveries_per_s", "streams", "clients")
        },
        "baseline_p50_ms": base["p50_ms"],
        "baseline_p99_ms": base["p99_ms"],
        "max_tokens_per_s_p99_under_50ms": best,
        "rate_per_stream": args.rate,
        "clients_per_stream": args.clients_per_stream,
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
