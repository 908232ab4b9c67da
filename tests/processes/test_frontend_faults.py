"""A frontend process under load and faults: bursts, frozen clients, SIGTERM, Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from bus.history import Topic
from bus.tokens import stream_token, thread_token
from tests.conftest import REDIS_URL, require_redis
from tests.support.frontend import SECRET, Frontend, append, collect, conversation, frontend
from tests.support.redis_server import OwnedRedis
from tests.support.waiting import wait_until_async


@pytest.fixture
async def aredis(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def _trace_url(server: Frontend, trace_id: str) -> str:
    return f"{server.url}/traces/{trace_id}/stream?token={stream_token(trace_id, secret=SECRET)}"


def _frames(text: str) -> list[dict[str, str]]:
    """The SSE frames of a body (comments dropped), each as {field: value}."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
        )
        if fields:
            frames.append(fields)
    return frames


# A burst of clients connecting at once -------------------------------------------------


async def test_a_burst_of_1000_clients_all_complete_on_their_first_try(
    prefix: str, aredis: aioredis.Redis
) -> None:
    """1,000 clients connect at once, then all resync at once after the hub reconnects.

    Both are more history reads at a time than the pool has connections: they
    wait their turn instead of cutting streams.
    """
    trace_id = f"t-{uuid.uuid4().hex}"
    tokens = [f"w{i:03d} ".ljust(2000, "-") for i in range(40)]
    events = conversation(tokens)
    topic = Topic("trace", trace_id)
    await append(aredis, prefix, [topic], events[:20], batch=20)
    clients = 1000
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    with frontend(REDIS_URL, prefix, LCBUS_FRONTEND_REDIS_CONNECTIONS="16") as server:
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            url = _trace_url(server, trace_id)
            started = [asyncio.Event() for _ in range(clients)]
            tasks = [asyncio.create_task(collect(http, "GET", url, started=e)) for e in started]
            await asyncio.gather(*(event.wait() for event in started))
            await append(aredis, prefix, [topic], events[20:25], batch=5)
            hub = f"{prefix}:frontend-hub:{server.process.pid}"
            hub_ids = [c["id"] for c in await aredis.client_list() if c.get("name") == hub]
            assert len(hub_ids) == 1
            await aredis.execute_command("CLIENT", "KILL", "ID", hub_ids[0])
            # Published while the hub had no subscription: every client resyncs for these.
            await append(aredis, prefix, [topic], events[25:], batch=len(events))
            got = await asyncio.gather(*tasks)
    assert len(got) == clients
    for one in got:
        assert one.error is None and one.ended
        assert one.seqs == list(range(1, len(events) + 1))
        assert one.text() == "".join(tokens)


# A frozen client -------------------------------------------------------------------------


def _frozen_client(server: Frontend, trace_id: str) -> socket.socket:
    """A raw socket that sends the request, reads the response head, then never reads."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that it fills soon
        sock.connect((host, int(port)))
        path = f"/traces/{trace_id}/stream?token={stream_token(trace_id, secret=SECRET)}"
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
    except BaseException:
        sock.close()
        raise
    return sock


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response, up to its last complete chunk."""
    body = b""
    while b"\r\n" in raw:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        body += rest[:size]
        raw = rest[size + 2 :]
    return body


def _read_to_the_end(sock: socket.socket) -> bytes:
    """Everything the server still sends; returns at EOF or reset."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize("token_bytes", [8, 64 * 1024], ids=["small-tokens", "large-tokens"])
async def test_a_frozen_client_is_disconnected_and_freed(
    prefix: str, aredis: aioredis.Redis, token_bytes: int
) -> None:
    """A client that stops reading (TCP open) is cut once its writes stay blocked.

    Before, it held its subscription until the 30 s send timeout, and its
    connection for as long as the client kept it open. A reading client on the
    same trace gets everything meanwhile.
    """
    trace_id = f"t-{uuid.uuid4().hex}"
    topic = Topic("trace", trace_id)
    # A send timeout far past the wait below: only the stall bound can drop the client.
    env = {
        "LCBUS_CLIENT_STALL_S": "1",
        "LCBUS_PING_INTERVAL_S": "1",
        "LCBUS_SEND_TIMEOUT_S": "120",
        "LCBUS_CLIENT_SEND_BUFFER_BYTES": "32768",
    }
    with contextlib.ExitStack() as stack, frontend(REDIS_URL, prefix, **env) as server:
        frozen = await asyncio.to_thread(_frozen_client, server, trace_id)
        stack.callback(frozen.close)
        await wait_until_async(
            lambda: asyncio.to_thread(lambda: server.health()["channels"] == 1),
            within=10,
            what="the frozen client's subscription",
        )
        tokens: list[str] = []

        async def released() -> bool:
            # Keep events coming, as a live run would, until the frozen client is gone.
            count = max(1, 200_000 // token_bytes)  # about 200 KB per round, whatever the size
            batch = [f"{len(tokens) + i:08d}".ljust(token_bytes, "x") for i in range(count)]
            tokens.extend(batch)
            await append(aredis, prefix, [topic], conversation(batch)[3:-3], batch=count)
            health = await asyncio.to_thread(server.health)
            return bool(health["channels"] == 0)

        await wait_until_async(released, within=40, what="the frozen client being dropped")
        rest = await asyncio.to_thread(_read_to_the_end, frozen)
        # What reached the client before the cut is an exact prefix of the stream.
        body = _dechunk(rest)
        complete = body[: body.rfind(b"\n\n") + 2].decode()
        frames = [f for f in _frames(complete) if "id" in f]
        texts = [json.loads(f["data"])["params"]["data"]["delta"]["text"] for f in frames]
        assert texts == tokens[: len(texts)]
        assert len(texts) < len(tokens)


# Graceful shutdown -------------------------------------------------------------------------


async def _sse_until_closed(url: str, opened: asyncio.Event) -> str:
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        opened.set()
        return "".join([text async for text in response.aiter_text()])


async def _ws_until_closed(url: str, thread_id: str, opened: asyncio.Event) -> tuple[int, str]:
    async with websockets.connect(url) as ws:
        params = {"channels": ["messages", "lifecycle"]}
        await ws.send(json.dumps({"id": 1, "method": "subscription.subscribe", "params": params}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "success"
        opened.set()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_sigterm_ends_every_stream_cleanly_and_exits_0(
    prefix: str, aredis: aioredis.Redis
) -> None:
    trace_id, thread_id = f"t-{uuid.uuid4().hex}", f"th-{uuid.uuid4().hex}"
    tokens = [f"t{i} " for i in range(30)]
    events = conversation(tokens)
    topics = [Topic("trace", trace_id), Topic("thread", thread_id)]
    await append(aredis, prefix, topics, events[:10], batch=10)
    with (
        frontend(REDIS_URL, prefix, LCBUS_DRAIN_S="5") as server,
        frontend(REDIS_URL, prefix) as other,
    ):
        opened = [asyncio.Event() for _ in range(4)]
        ws_url = f"ws{server.url.removeprefix('http')}/threads/{thread_id}/stream"
        ws_url += f"?token={thread_token(thread_id, secret=SECRET)}"
        sse = [
            asyncio.create_task(_sse_until_closed(_trace_url(server, trace_id), e))
            for e in opened[:2]
        ]
        ws = [asyncio.create_task(_ws_until_closed(ws_url, thread_id, e)) for e in opened[2:]]
        for event in opened:
            await event.wait()
        await wait_until_async(
            lambda: asyncio.to_thread(lambda: server.health()["channels"] == 2),
            within=10,
            what="every client subscribed",
        )
        server.process.send_signal(signal.SIGTERM)
        bodies = await asyncio.gather(*sse)
        closes = await asyncio.gather(*ws)
        code = await asyncio.to_thread(server.process.wait, 15)
        assert code == 0
        # "Service restart": reconnect. The reason is the bus's own when its drain
        # reached the socket first, empty when uvicorn's shutdown did.
        assert [code for code, _ in closes] == [1012] * 2
        assert {reason for _, reason in closes} <= {"server_shutdown", ""}
        # Each SSE client got the history, then a reconnect frame with a retry hint.
        for body in bodies:
            frames = _frames(body)
            assert [json.loads(f["data"])["seq"] for f in frames[:-1]] == list(range(1, 11))
            farewell = frames[-1]
            assert farewell["event"] == "reconnect" and farewell["retry"] == "1000"
            last_id = frames[-2]["id"]
            assert json.loads(farewell["data"]) == {
                "reason": "server_shutdown",
                "lastEventId": last_id,
            }
        # Reconnecting elsewhere with that id resumes exactly.
        await append(aredis, prefix, topics, events[10:], batch=len(events))
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"Last-Event-ID": _frames(bodies[0])[-2]["id"]}
            resumed = await collect(http, "GET", _trace_url(other, trace_id), headers=headers)
    assert resumed.ended and resumed.seqs == list(range(11, len(events) + 1))


# Redis outages under a stream ------------------------------------------------------------


@pytest.fixture
def owned_redis() -> Iterator[OwnedRedis]:
    with OwnedRedis() as server:
        server.start()
        yield server
        if server.process is not None:
            server.resume()


@pytest.mark.parametrize("fault", ["sigstop", "sigkill"])
async def test_a_replay_during_a_redis_outage_ends_with_a_retryable_error(
    owned_redis: OwnedRedis, fault: str
) -> None:
    """The client pauses mid-history; Redis fails; the next history read cannot be served."""
    require_redis()
    prefix = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    trace_id = f"t-{uuid.uuid4().hex}"
    tokens = [f"{i:05d}".ljust(2000, ".") for i in range(2500)]
    events = conversation(tokens)
    client = aioredis.Redis.from_url(owned_redis.url)
    await append(client, prefix, [Topic("trace", trace_id)], events, batch=500)
    env = {"LCBUS_FRONTEND_REDIS_TIMEOUT_S": "1", "LCBUS_PING_INTERVAL_S": "1"}
    try:
        with frontend(owned_redis.url, prefix, **env) as server:
            async with (
                httpx.AsyncClient(timeout=30) as http,
                http.stream("GET", _trace_url(server, trace_id)) as response,
            ):
                chunks = response.aiter_text()
                body = await anext(chunks)
                # The server is now blocked writing the first history page (2 MB).
                if fault == "sigstop":
                    owned_redis.pause()
                else:
                    owned_redis.kill()
                body += "".join([text async for text in chunks])
            if fault == "sigstop":
                owned_redis.resume()
            frames = _frames(body)
            error = frames[-1]
            assert error["event"] == "error" and error["retry"] == "1000"
            payload = json.loads(error["data"])
            assert payload["code"] == "unavailable" and payload["retryable"] is True
            seqs = [json.loads(f["data"])["seq"] for f in frames[:-1]]
            assert seqs == list(range(1, len(seqs) + 1)) and 0 < len(seqs) < len(events)
            if fault == "sigstop":
                # Redis is back: resuming from the last id gets exactly the rest.
                async with httpx.AsyncClient(timeout=30) as http:
                    headers = {"Last-Event-ID": frames[-2]["id"]}
                    rest = await collect(http, "GET", _trace_url(server, trace_id), headers=headers)
                assert rest.ended and rest.seqs == list(range(len(seqs) + 1, len(events) + 1))
    finally:
        if owned_redis.process is not None:
            owned_redis.resume()
        await client.aclose(close_connection_pool=True)


async def test_a_thread_stream_whose_redis_dies_mid_history_ends_with_an_error_frame(
    owned_redis: OwnedRedis,
) -> None:
    """``POST /threads/{id}/stream/events`` (the SDKs' SSE stream), as above: the
    stream ends with the protocol's ``unavailable`` ErrorResponse, not cut."""
    prefix = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    thread_id = f"th-{uuid.uuid4().hex}"
    events = conversation([f"{i:05d}".ljust(2000, ".") for i in range(2500)])
    client = aioredis.Redis.from_url(owned_redis.url)
    await append(client, prefix, [Topic("thread", thread_id)], events, batch=500)
    await client.aclose(close_connection_pool=True)
    env = {"LCBUS_FRONTEND_REDIS_TIMEOUT_S": "1", "LCBUS_PING_INTERVAL_S": "1"}
    auth = {"Authorization": f"Bearer {thread_token(thread_id, secret=SECRET)}"}
    body = {"channels": ["lifecycle", "messages"]}
    with frontend(owned_redis.url, prefix, **env) as server:
        url = f"{server.url}/threads/{thread_id}/stream/events"
        async with (
            httpx.AsyncClient(timeout=30) as http,
            http.stream("POST", url, json=body, headers=auth) as response,
        ):
            chunks = response.aiter_text()
            text = await anext(chunks) + await anext(chunks)
            owned_redis.kill()  # the server is blocked writing the first history page
            async for chunk in chunks:
                text += chunk
                if '"type":"error"' in chunk:
                    break  # a thread's stream stays open after its last frame
    frames = [json.loads(f["data"]) for f in _frames(text) if "data" in f]
    error = frames[-1]
    assert (error["type"], error["id"], error["error"]) == ("error", None, "unavailable")
    seqs = [f["seq"] for f in frames[:-1]]
    assert seqs == list(range(1, len(seqs) + 1)) and 0 < len(seqs) < len(events)


def _socket_url(server: Frontend, thread_id: str, path: str) -> str:
    token = thread_token(thread_id, secret=SECRET)
    return f"{server.url.replace('http', 'ws')}/threads/{thread_id}/{path}?token={token}"


async def _frames_until_close(ws: websockets.ClientConnection) -> list[dict[str, object]]:
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    return frames


def _command(command_id: int, method: str, params: dict[str, Any]) -> str:
    return json.dumps({"id": command_id, "method": method, "params": params})


SOCKET_PATHS = ["stream", "stream/events"]
"""The session's WebSocket, and the one LangGraph's SDKs open."""


class _ResumingReader:
    """A WebSocket client that does what the SDKs do: on a close it reconnects and
    resumes from the last event id it has. Every close it saw is kept, with the
    last frame before it."""

    def __init__(self, url: str, thread_id: str) -> None:
        self.url = url
        self.thread_id = thread_id
        self.events: list[dict[str, Any]] = []
        self.closes: list[tuple[int | None, str | None, dict[str, Any] | None]] = []
        self.sub_id: str | None = None

    async def read(self, count: int) -> None:
        while len(self.events) < count:
            async with websockets.connect(self.url) as ws:
                last: dict[str, Any] | None = None
                try:
                    await self._open(ws)
                    while len(self.events) < count:
                        last = json.loads(await ws.recv())
                        if last["type"] == "event":
                            self.events.append(last)
                except websockets.ConnectionClosed:
                    self.closes.append((ws.close_code, ws.close_reason, last))
                    await asyncio.sleep(0.2)

    async def _open(self, ws: websockets.ClientConnection) -> None:
        if self.sub_id is None:
            params: dict[str, Any] = {"channels": ["lifecycle", "messages"]}
            await ws.send(_command(1, "subscription.subscribe", params))
            self.sub_id = json.loads(await ws.recv())["result"]["subscription_id"]
            return
        params = {"run_id": self.thread_id, "subscriptions": [self.sub_id]}
        if self.events:
            params["last_event_id"] = self.events[-1]["event_id"]
        await ws.send(_command(1, "subscription.reconnect", params))


@pytest.mark.parametrize("path", SOCKET_PATHS)
async def test_a_websocket_whose_redis_dies_loses_nothing_and_never_just_drops(path: str) -> None:
    """Redis is SIGKILLed under a live socket, then restarted from its AOF.

    A socket that waits for live events may wait out the outage; one whose read
    finds Redis gone is told ``unavailable`` and closes with 1013, and the client
    resumes from its last event id. Which happens depends on when the kill lands.
    Either way every event arrives once, in order, and no socket closes without
    that error frame and code.
    """
    prefix = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    thread_id = f"th-{uuid.uuid4().hex}"
    events = conversation(["Hello", " there", ", you"])
    env = {"LCBUS_FRONTEND_REDIS_TIMEOUT_S": "1", "LCBUS_PING_INTERVAL_S": "1"}
    with OwnedRedis(aof=True) as server:
        server.start()
        await _append_to(server, prefix, thread_id, events[:3])
        with frontend(server.url, prefix, **env) as front:
            reader = _ResumingReader(_socket_url(front, thread_id, path), thread_id)
            reading = asyncio.create_task(reader.read(len(events)))
            await wait_until_async(lambda: len(reader.events) == 3, within=30, what="history")
            server.kill()
            await asyncio.sleep(2)  # past the frontend's socket timeout
            server.start()
            await _append_to(server, prefix, thread_id, events[3:])
            await asyncio.wait_for(reading, 60)
    assert [e["seq"] for e in reader.events] == list(range(1, len(events) + 1))
    for code, reason, frame in reader.closes:
        assert (code, reason) == (1013, "unavailable")
        assert frame is not None and frame["type"] == "error" and frame["error"] == "unavailable"


async def _append_to(server: OwnedRedis, prefix: str, thread_id: str, events: list[Any]) -> None:
    client = aioredis.Redis.from_url(server.url)
    try:
        await append(client, prefix, [Topic("thread", thread_id)], events)
    finally:
        await client.aclose(close_connection_pool=True)


@pytest.mark.parametrize("path", SOCKET_PATHS)
async def test_a_websocket_command_that_finds_redis_gone_closes_with_a_frame_that_says_so(
    owned_redis: OwnedRedis, path: str
) -> None:
    """A ``subscription.reconnect`` reads history; Redis was killed just before.

    The client gets an ``unavailable`` error and close code 1013 (reconnect
    later), not a connection dropped without a close frame.
    """
    prefix = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    thread_id = f"th-{uuid.uuid4().hex}"
    client = aioredis.Redis.from_url(owned_redis.url)
    await append(client, prefix, [Topic("thread", thread_id)], conversation(["Hi"]))
    await client.aclose(close_connection_pool=True)
    env = {"LCBUS_FRONTEND_REDIS_TIMEOUT_S": "1", "LCBUS_PING_INTERVAL_S": "1"}
    params = {"run_id": thread_id, "last_event_id": "1-0", "subscriptions": []}
    with frontend(owned_redis.url, prefix, **env) as server:
        async with websockets.connect(_socket_url(server, thread_id, path)) as ws:
            owned_redis.kill()
            await ws.send(
                json.dumps({"id": 1, "method": "subscription.reconnect", "params": params})
            )
            frames = await _frames_until_close(ws)
    assert ws.close_code == 1013 and ws.close_reason == "unavailable"
    assert frames[-1]["type"] == "error" and frames[-1]["id"] is None
    assert frames[-1]["error"] == "unavailable"
