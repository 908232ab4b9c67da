"""The demo's clients: an SSE stream watcher, JSON polling, and a tree printer."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import httpx
from httpx_sse import connect_sse

from bus.demo.stack import DemoError


class StreamWatcher(threading.Thread):
    """Follows one trace's SSE stream, printing the answer's text as it arrives."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(name="demo-sse-client", daemon=True)
        self.url = url
        self.token = token
        self.seqs: list[int] = []
        self.text = ""
        self.tokens = 0
        self.ended = False
        self.error = ""
        self.latencies_ms: list[float] = []
        self._connected = threading.Event()
        self._tty = sys.stdout.isatty()

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=120)) as client,
                connect_sse(client, "GET", self.url, params={"token": self.token}) as source,
            ):
                source.response.raise_for_status()
                self._connected.set()
                for sse in source.iter_sse():
                    if sse.event == "end":
                        self.ended = True
                        return
                    if sse.event == "error":
                        self.error = sse.data
                        return
                    self._on_event(json.loads(sse.data))
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._connected.set()

    def _on_event(self, envelope: dict[str, Any]) -> None:
        self.seqs.append(envelope["seq"])
        params = envelope["params"]
        data = params.get("data") or {}
        delta = data.get("delta") or {}
        if (
            envelope["method"] == "messages"
            and data.get("event") == "content-block-delta"
            and (delta.get("type") == "text-delta")
        ):
            self.latencies_ms.append(time.time() * 1000 - params["timestamp"])
            self.tokens += 1
            self.text += delta["text"]
            self._show(delta["text"])

    def _show(self, piece: str) -> None:
        if self._tty:
            tail = self.text[-60:].replace("\n", " ")
            sys.stdout.write(
                f"\r\033[K[{self.tokens:>3} tokens | {len(self.seqs):>3} events] {tail}"
            )
        else:
            sys.stdout.write(piece)
        sys.stdout.flush()

    def start(self) -> None:
        super().start()
        if not self._connected.wait(15):
            raise DemoError("the SSE client could not connect to the frontend")
        if self.error:
            raise DemoError(f"the SSE client failed: {self.error}")
        print("stream   ", end="", flush=True)

    def wait(self, timeout: float) -> StreamWatcher:
        self.join(timeout)
        if self.is_alive():
            raise DemoError(f"the stream did not end within {timeout:.0f} s")
        if self.error:
            raise DemoError(f"the stream failed: {self.error}")
        return self

    @property
    def events(self) -> int:
        return len(self.seqs)

    @property
    def contiguous(self) -> bool:
        return self.seqs == list(range(1, len(self.seqs) + 1))

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 1)


def fetch_json(
    url: str, token: str, *, until_complete: bool, timeout: float
) -> dict[str, Any] | None:
    """GET a JSON document, polling until its ``completed`` flag is set when asked."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        if response.status_code == 200:
            body = response.json()
            if not until_complete or (body and body.get("completed")):
                return body
        time.sleep(0.1)
    return body


def wait_for_deliveries(url: str, expected: int, timeout: float) -> list[dict[str, Any]]:
    """What the webhook receiver got, once ``expected`` arrived or the time ran out."""
    deadline = time.monotonic() + timeout
    deliveries: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        deliveries = httpx.get(url, timeout=5).json()
        if len(deliveries) >= expected:
            break
        time.sleep(0.1)
    return deliveries


def render_tree(trace: dict[str, Any] | None) -> str:
    """The run tree, indented, with durations, token counts and errors."""
    if not trace or not trace.get("root"):
        return "trace    (not available)"
    lines = [f"trace    {trace['trace_id']}  {trace['status']}"]

    def walk(node: dict[str, Any], depth: int) -> None:
        duration = node.get("duration_ms")
        parts = [f"{duration:8.1f} ms" if duration is not None else "  running  "]
        usage = node.get("usage")
        if usage:
            total = usage.get("total_tokens")
            parts.append(f"{'?' if total is None else total} tok")
        if node.get("token_count"):
            parts.append(f"{node['token_count']} streamed")
        if node.get("error"):
            parts.append(f"ERROR {node['error']}")
        label = f"{'  ' * depth}{node['name']} ({node['run_type']})"
        lines.append(f"  {label:<56} {'  '.join(parts)}")
        for child in node.get("children", []):
            walk(child, depth + 1)

    walk(trace["root"], 0)
    return "\n".join(lines)
