"""The client side of ``bench.clients``: one process holding many raw asyncio SSE clients.

``python -m bench._sse_clients SPEC RESULT``: SPEC is a JSON file with the
clients' URLs, the wall-clock time at which they all connect (one burst) and
how many may be opening at once. Each client is an ``asyncio.Protocol`` on its
own connection (uvloop when installed) that parses the HTTP/1.1 response by
hand, de-chunks the body in its ``data_received`` callback and splits it into
SSE frames, with no reader task and no await per chunk: with aiohttp (one
task, a stream reader and an async iterator step per chunk) two client
processes on a 2-core machine were busy enough to show in the latencies
they measure, the relay baseline's included. Each client reads its stream to
``event: end``, decodes every envelope, and records

- whether its sequence numbers run 1, 2, 3, ... with no gap and no duplicate
  (a client that connects late gets the earlier ones from history);
- a digest of its text (the content-block deltas, concatenated), which the
  benchmark compares with the tokens the app sent;
- how often it resumed: on a retryable error (``unavailable``: Redis did not
  answer in time) it reconnects with ``Last-Event-ID``, as an EventSource
  does, and the checks above run across the resume;
- the latency of every token sent after its stream opened: each token's text
  carries its send time (``time.time_ns()`` at the handler call), receipt is
  the time of the socket read that completed its frame. Those sent two
  seconds or more after the stream opened are also kept apart (``steady``):
  the latency of a client that follows live, past the burst's history reads.

It prints ``ready OPEN FAILED`` once every client's stream is open or has
failed, so that the benchmark can measure an idle frontend holding them, and
writes one JSON object to RESULT when every client has finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

try:
    import uvloop
except ImportError:  # pragma: no cover - the frontend extra brings it
    uvloop = None

MARK = re.compile(rb"~(\d+)\.")
CONNECT_S = 60.0
# Past the burst: by then every client of a burst has read its history and follows live.
STEADY_NS = 2_000_000_000


class _Delta(msgspec.Struct):
    text: str = ""


class _Data(msgspec.Struct):
    event: str = ""
    delta: _Delta | None = None


class _Params(msgspec.Struct):
    data: _Data


class _Envelope(msgspec.Struct):
    seq: int
    method: str
    params: _Params


_decode = msgspec.json.Decoder(_Envelope).decode


@dataclass
class _Client:
    url: str
    connected_ns: int = 0
    last_seq: int = 0
    seq_ok: bool = True
    ended: bool = False
    error: str | None = None
    retryable: bool = False
    last_id: str = ""
    resumes: int = 0
    text: hashlib._Hash = field(default_factory=hashlib.sha256)
    latencies: list[int] = field(default_factory=list)
    steady: list[int] = field(default_factory=list)
    """Latencies of the tokens sent ``STEADY_NS`` or more after the stream opened."""

    def frame(self, frame: bytes, now: int) -> None:
        """One SSE frame (without its blank line)."""
        event, data, event_id = b"message", b"", b""
        for line in frame.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"id: "):
                event_id = line[4:]
        if event == b"end":
            self.ended = True
        elif event == b"error" and b'"retryable": true' in data:
            self.retryable = True
        elif event != b"message":
            self.error = (event + b" " + data).decode()
        elif data:
            self._envelope(data, now)
            self.last_id = event_id.decode()

    def _envelope(self, data: bytes, now: int) -> None:
        envelope = _decode(data)
        if envelope.seq != self.last_seq + 1:
            self.seq_ok = False
        self.last_seq = envelope.seq
        delta = envelope.params.data.delta
        if envelope.params.data.event != "content-block-delta" or delta is None:
            return
        self.text.update(delta.text.encode())
        for sent in MARK.findall(delta.text.encode()):
            sent_ns = int(sent)
            if sent_ns >= self.connected_ns:
                self.latencies.append(now - sent_ns)
                if sent_ns >= self.connected_ns + STEADY_NS:
                    self.steady.append(now - sent_ns)

    def report(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ended": self.ended,
            "seq_ok": self.seq_ok,
            "events": self.last_seq,
            "resumes": self.resumes,
            "error": self.error,
            "text_sha256": self.text.hexdigest(),
        }


async def _read(client: _Client, gate: asyncio.Semaphore, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not (client.ended or client.error):
                await _read_once(client, gate)
                if client.retryable:
                    client.retryable = False
                    client.resumes += 1
                    await asyncio.sleep(1.0)  # the stream's retry: hint
    except (OSError, TimeoutError) as exc:
        client.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not client.connected_ns:
            _Progress.settled(opened=False)


async def _read_once(client: _Client, gate: asyncio.Semaphore) -> None:
    host, port, path = _split(client.url)
    request = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n" % (
        path.encode(),
        host.encode(),
        port,
    )
    if client.last_id:
        request += b"Last-Event-ID: %s\r\n" % client.last_id.encode()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    async with gate:
        async with asyncio.timeout(CONNECT_S):
            transport, _ = await loop.create_connection(lambda: _Stream(client, done), host, port)
    try:
        transport.write(request + b"\r\n")
        await done
    finally:
        transport.close()


def _split(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    authority, _, path = rest.partition("/")
    host, _, port = authority.partition(":")
    return host, int(port or 80), "/" + path


class _Stream(asyncio.Protocol):
    """One HTTP/1.1 response: the status line and headers, then the chunked body's SSE frames.

    Parsed by hand on the protocol's callbacks (no reader task, no per-chunk await):
    the generator must cost less per event than the servers it measures.
    """

    def __init__(self, client: _Client, done: asyncio.Future[None]) -> None:
        self.client = client
        self.done = done
        self.head = True
        self.chunked = False
        self.raw = b""  # bytes not yet de-chunked (or the head, until it is complete)
        self.sse = b""  # de-chunked bytes not yet split into frames

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        now = time.time_ns()
        self.raw += data
        if self.head and not self._head():
            return
        if self.chunked:
            self._dechunk()
        else:
            self.sse += self.raw
            self.raw = b""
        if b"\n\n" in self.sse or b"\r\n\r\n" in self.sse:
            *frames, self.sse = self.sse.replace(b"\r\n", b"\n").split(b"\n\n")
            client = self.client
            for frame in frames:
                client.frame(frame, now)
            if client.ended or client.error or client.retryable:
                self._finish()

    def _head(self) -> bool:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.raw = self.raw[:end].lower(), self.raw[end + 4 :]
        self.head = False
        status = head.split(b" ", 2)
        if len(status) < 2 or status[1] != b"200":
            self.client.error = f"HTTP {status[1].decode() if len(status) > 1 else '?'}"
            self._finish()
            return False
        self.chunked = b"transfer-encoding: chunked" in head
        if not self.client.connected_ns:
            self.client.connected_ns = time.time_ns()
            _Progress.settled(opened=True)
        return True

    def _dechunk(self) -> None:
        raw, at = self.raw, 0
        parts = [self.sse]
        while True:
            line_end = raw.find(b"\r\n", at)
            if line_end < 0:
                break
            size = int(raw[at:line_end].split(b";", 1)[0], 16)
            start = line_end + 2
            if size == 0:
                at = len(raw)  # the last chunk: the body is complete
                break
            if len(raw) < start + size + 2:
                break
            parts.append(raw[start : start + size])
            at = start + size + 2
        self.raw = raw[at:]
        self.sse = b"".join(parts)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        # After _finish the close is ours (and the client may already be resuming).
        if not self.done.done() and not (client.ended or client.error or client.retryable):
            client.error = (
                f"{type(exc).__name__}: {exc}" if exc else "the stream closed before its end"
            )
        self._finish()


class _Progress:
    opened = 0
    failed = 0
    total = 0

    @classmethod
    def settled(cls, *, opened: bool) -> None:
        if opened:
            cls.opened += 1
        else:
            cls.failed += 1
        if cls.opened + cls.failed == cls.total:
            print(f"ready {cls.opened} {cls.failed}", flush=True)


def raise_fd_limit() -> None:
    """Every open stream is a file descriptor: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    urls: list[str] = spec["urls"]
    clients = [_Client(url) for url in urls]
    _Progress.total = len(clients)
    gate = asyncio.Semaphore(spec.get("opening_at_once", len(urls)))
    timeout_s = spec.get("timeout_s", 300)
    await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
    await asyncio.gather(*(_read(client, gate, timeout_s) for client in clients))
    latencies = [lat for client in clients for lat in client.latencies]
    steady = [lat for client in clients for lat in client.steady]
    return {
        "clients": [c.report() for c in clients],
        "latencies_ns": latencies,
        "steady_latencies_ns": steady,
    }


if __name__ == "__main__":
    raise_fd_limit()
    spec_path, result_path = sys.argv[1:3]
    # uvloop when installed (the frontend extra): the clients are measured, not measuring.
    run = uvloop.run if uvloop is not None else asyncio.run
    result = run(main(json.loads(Path(spec_path).read_text())))
    Path(result_path).write_text(json.dumps(result))
