"""Helpers for the frontend tests: frontend processes, protocol events, SSE clients."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from langchain_protocol import protocol
from pydantic import TypeAdapter

from bus.demo.ports import free_port
from bus.history import SCRIPTS, HistoryWriter, Outgoing, Topic
from bus.keys import Keys
from bus.scripts import execute
from tests.support.processes import ROOT
from tests.support.protocol import check_keys
from tests.support.waiting import wait_until

SECRET = "test-secret"

EVENT = TypeAdapter(protocol.Event)
MESSAGES_DATA = TypeAdapter(protocol.MessagesData)
LIFECYCLE_DATA = TypeAdapter(protocol.LifecycleData)


@dataclass
class Frontend:
    url: str
    process: subprocess.Popen[bytes]

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=5).json()
        return body


@contextlib.contextmanager
def frontend(redis_url: str, prefix: str, port: int = 0, **env: str) -> Iterator[Frontend]:
    """A frontend started from its command line (``python -m bus.cli serve``), on
    ``port`` (a free one when 0)."""
    port = port or free_port()
    child_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LCBUS_REDIS_URL": redis_url,
        "LCBUS_PREFIX": prefix,
        "LCBUS_STREAM_SECRET": SECRET,
        **env,
    }
    cmd = [sys.executable, "-m", "bus.cli", "serve", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(cmd, cwd=ROOT, env=child_env)
    server = Frontend(f"http://127.0.0.1:{port}", process)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: Frontend) -> None:
    def healthy() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"frontend exited with {server.process.returncode}")
        try:
            return bool(server.health()["ok"])
        except httpx.HTTPError:
            return False

    wait_until(healthy, within=20, what="frontend healthy", every=0.1)


def _event(method: str, data: dict[str, Any], namespace: list[str] | None = None) -> bytes:
    params = {"namespace": namespace or [], "timestamp": int(time.time() * 1000), "data": data}
    return json.dumps({"method": method, "params": params}).encode()


def conversation(tokens: list[str], *, namespace: list[str] | None = None) -> list[Outgoing]:
    """A trace's protocol events: lifecycle, one AI message streamed token by token, final."""
    ns = namespace or []
    out = [Outgoing("lifecycle", _event("lifecycle", {"event": "started"}, ns))]
    out.append(Outgoing("messages", _event("messages", _start(), ns)))
    out.append(Outgoing("messages", _event("messages", _block_start(), ns)))
    for token in tokens:
        delta = {"event": "content-block-delta", "index": 0, "delta": _text(token)}
        out.append(Outgoing("messages", _event("messages", delta, ns)))
    finish = {"event": "content-block-finish", "index": 0, "content": _text("".join(tokens))}
    finish["content"]["type"] = "text"
    out.append(Outgoing("messages", _event("messages", finish, ns)))
    usage = {"event": "message-finish", "usage": {"output_tokens": len(tokens)}}
    out.append(Outgoing("messages", _event("messages", usage, ns)))
    done = _event("lifecycle", {"event": "completed"}, ns)
    out.append(Outgoing("lifecycle", done, final=True))
    return out


def _start() -> dict[str, Any]:
    return {"event": "message-start", "role": "ai", "id": "msg-1"}


def _block_start() -> dict[str, Any]:
    return {"event": "content-block-start", "index": 0, "content": {"type": "text", "text": ""}}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text-delta", "text": text}


async def append(
    redis: aioredis.Redis,
    prefix: str,
    topics: list[Topic],
    events: list[Outgoing],
    *,
    batch: int = 1,
) -> None:
    """Append ``events`` to every topic, ``batch`` events per script run."""
    writer = HistoryWriter(redis, Keys(prefix), maxlen=100_000, ttl_s=600)
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]

        def build(pipe: Any, chunk: list[Outgoing] = chunk) -> None:
            for topic in topics:
                writer.queue(pipe, topic, chunk)

        await execute(redis, SCRIPTS, build)


@dataclass
class Received:
    """What one client got: envelopes in order, and any error/end frames."""

    envelopes: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    ended: bool = False
    retry: int | None = None
    """The ``retry:`` hint the stream gave."""

    @property
    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.envelopes]

    def text(self) -> str:
        parts = []
        for env in self.envelopes:
            data = env["params"]["data"]
            if env["method"] == "messages" and data["event"] == "content-block-delta":
                parts.append(data["delta"]["text"])
        return "".join(parts)


def validate(envelope: dict[str, Any]) -> None:
    """Raise unless ``envelope`` is a protocol event whose data fits its channel."""
    EVENT.validate_python(envelope)
    check_keys(envelope)
    data = envelope["params"]["data"]
    if envelope["method"] == "messages":
        MESSAGES_DATA.validate_python(data)
    elif envelope["method"] == "lifecycle":
        LIFECYCLE_DATA.validate_python(data)
    assert isinstance(envelope["event_id"], str)
    assert isinstance(envelope["params"]["namespace"], list)


async def collect(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    limit: int | None = None,
    started: Any = None,
    into: Received | None = None,
    **kwargs: Any,
) -> Received:
    """Read one SSE stream to its end (or ``limit`` events); ``started`` is set on connect.
    Events are appended to ``into`` as they arrive when given (a test can watch progress)."""
    from httpx_sse import aconnect_sse

    got = Received() if into is None else into
    async with aconnect_sse(client, method, url, **kwargs) as source:
        source.response.raise_for_status()
        if started is not None:
            started.set()
        async for sse in source.aiter_sse():
            if sse.retry is not None:
                got.retry = sse.retry
            if not sse.data:
                continue  # a frame with only a retry hint
            if sse.event == "error":
                got.error = json.loads(sse.data)
                break
            if sse.event == "end":
                got.ended = True
                break
            if not sse.data:
                # A keep-alive comment (": ping"): httpx-sse reports it as an
                # empty message carrying the last id.
                continue
            envelope = json.loads(sse.data)
            got.envelopes.append(envelope)
            got.ids.append(sse.id)
            if limit is not None and len(got.envelopes) >= limit:
                break
    return got
