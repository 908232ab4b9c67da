"""The client side of ``bench.clients``: one process holding many aiohttp SSE clients.

``python -m bench._sse_clients SPEC RESULT``: SPEC is a JSON file with the
clients' URLs, the wall-clock time at which they all connect (one burst) and
how many may be opening at once. Each client reads its stream to ``event: end``
with aiohttp (its HTTP parser is C: an httpx client costs more CPU per event
than the frontend it measures, on a 2-core machine), splits it into SSE
frames, decodes every envelope, and records

- whether its sequence numbers run 1, 2, 3, ... with no gap and no duplicate
  (a client that connects late gets the earlier ones from history);
- a digest of its text (the content-block deltas, concatenated), which the
  benchmark compares with the tokens the app sent;
- how often it resumed: on a retryable error (``unavailable``: Redis did not
  answer in time) it reconnects with ``Last-Event-ID``, as an EventSource
  does, and the checks above run across the resume;
- the latency of every token sent after its stream opened: each token's text
  carries its send time (``time.time_ns()`` at the handler call), receipt is
  the time of the socket read that completed its frame.

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

import aiohttp
import msgspec

MARK = re.compile(rb"~(\d+)\.")


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
            if int(sent) >= self.connected_ns:
                self.latencies.append(now - int(sent))

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


async def _read(http: aiohttp.ClientSession, client: _Client, gate: asyncio.Semaphore) -> None:
    try:
        while not (client.ended or client.error):
            await _read_once(http, client, gate)
            if client.retryable:
                client.retryable = False
                client.resumes += 1
                await asyncio.sleep(1.0)  # the stream's retry: hint
    except (aiohttp.ClientError, TimeoutError) as exc:
        client.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not client.connected_ns:
            _Progress.settled(opened=False)


async def _read_once(http: aiohttp.ClientSession, client: _Client, gate: asyncio.Semaphore) -> None:
    headers = {"Accept": "text/event-stream"}
    if client.last_id:
        headers["Last-Event-ID"] = client.last_id
    async with gate:
        response = await http.get(client.url, headers=headers)
    async with response:
        if response.status != 200:
            client.error = f"HTTP {response.status}"
            return
        if not client.connected_ns:
            client.connected_ns = time.time_ns()
            _Progress.settled(opened=True)
        buffer = b""
        async for data in response.content.iter_any():
            now = time.time_ns()
            *frames, buffer = (buffer + data).replace(b"\r\n", b"\n").split(b"\n\n")
            for frame in frames:
                client.frame(frame, now)
            if client.ended or client.error or client.retryable:
                return
        if not (client.ended or client.retryable):
            client.error = "the stream closed before its end"


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
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=spec.get("timeout_s", 300), connect=60)
    gate = asyncio.Semaphore(spec.get("opening_at_once", len(urls)))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        await asyncio.gather(*(_read(http, client, gate) for client in clients))
    latencies = [lat for client in clients for lat in client.latencies]
    return {"clients": [c.report() for c in clients], "latencies_ns": latencies}


if __name__ == "__main__":
    raise_fd_limit()
    spec_path, result_path = sys.argv[1:3]
    result = asyncio.run(main(json.loads(Path(spec_path).read_text())))
    Path(result_path).write_text(json.dumps(result))
