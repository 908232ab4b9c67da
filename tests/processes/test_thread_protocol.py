"""LangGraph's thread-stream routes on real frontend processes, at the protocol level:
resume points, a trace read as a thread, tokens, CORS, commands and WebSocket
subscriptions. History is written with :class:`HistoryWriter`, as in
``test_frontend_stream``; ``test_langgraph_sdk`` drives the same routes with the SDKs."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import websockets

from bus.history import Topic
from bus.tokens import stream_token, thread_token
from tests.conftest import REDIS_URL, require_redis
from tests.support.frontend import SECRET, Frontend, Received, append, collect, conversation
from tests.support.frontend import frontend as start_frontend
from tests.support.protocol import validate

TOKENS = [f"w{i} " for i in range(12)]
TOTAL = len(conversation(TOKENS))
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def module_prefix() -> Iterator[str]:
    require_redis()
    name = f"lcbus-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def server(module_prefix: str) -> Iterator[Frontend]:
    env = {"LCBUS_CORS_ORIGINS": f"{ORIGIN}, http://other.example", "LCBUS_PING_INTERVAL_S": "1"}
    with start_frontend(REDIS_URL, module_prefix, **env) as running:
        yield running


@pytest.fixture
async def aredis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        yield client


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _read(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], limit: int, **headers: str
) -> Received:
    got = await collect(http, "POST", url, json=body, limit=limit, headers=headers)
    for envelope in got.envelopes:
        validate(envelope)
    assert got.ids == [e["event_id"] for e in got.envelopes]
    return got


async def test_resume_from_since_last_event_id_and_the_durable_cursor(
    server: Frontend, module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    await append(aredis, module_prefix, [Topic("thread", thread_id)], conversation(TOKENS))
    url = f"{server.url}/threads/{thread_id}/stream/events"
    auth = _bearer(thread_token(thread_id, secret=SECRET))
    body: dict[str, Any] = {"channels": ["messages", "lifecycle"]}
    full = await _read(http, url, body, TOTAL, **auth)
    assert full.retry == 1000
    assert full.seqs == list(range(1, TOTAL + 1))
    assert full.text() == "".join(TOKENS)
    cut = 5
    rest = list(range(cut + 1, TOTAL + 1))
    by_seq = await _read(http, url, {**body, "since": cut}, TOTAL - cut, **auth)
    cursor = {**body, "since_event_id": full.ids[cut - 1]}
    by_cursor = await _read(http, url, cursor, TOTAL - cut, **auth)
    by_header = await _read(http, url, body, TOTAL - cut, **auth, **{"Last-Event-ID": full.ids[4]})
    for got in (by_seq, by_cursor, by_header):
        assert got.seqs == rest
        assert got.ids == full.ids[cut:]
    # A cursor that is not in history: one protocol ErrorResponse, then the stream ends.
    missing = await collect(
        http, "POST", url, json={**body, "since_event_id": "99999999999999-0"}, headers=auth
    )
    [error] = missing.envelopes
    assert (error["type"], error["id"], error["error"]) == ("error", None, "invalid_argument")
    assert error["message"].startswith("invalid_position: ")


async def test_a_trace_reads_as_a_thread_of_one_run_even_before_it_starts(
    server: Frontend, module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id = str(uuid.uuid4())
    url = f"{server.url}/threads/{trace_id}/stream/events"
    auth = _bearer(stream_token(trace_id, secret=SECRET))
    reader = asyncio.create_task(_read(http, url, {"channels": ["messages"]}, TOTAL - 2, **auth))
    await asyncio.sleep(0.5)  # the client is connected and waiting for the trace to exist
    assert not reader.done()
    await append(aredis, module_prefix, [Topic("trace", trace_id)], conversation(TOKENS))
    got = await asyncio.wait_for(reader, 20)
    assert got.text() == "".join(TOKENS)
    assert {e["method"] for e in got.envelopes} == {"messages"}


async def test_tokens_work_as_bearer_and_keep_their_scopes(
    server: Frontend, http: httpx.AsyncClient
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    url = f"{server.url}/threads/{thread_id}/stream/events"
    body = {"channels": ["messages"]}
    cases = [
        ({}, 401),
        (_bearer("garbage"), 403),
        (_bearer(thread_token("another-thread", secret=SECRET)), 403),
        (_bearer(stream_token("another-trace", secret=SECRET)), 403),
    ]
    for headers, status in cases:
        response = await http.post(url, json=body, headers=headers)
        assert response.status_code == status, headers
        reply = response.json()
        assert (reply["type"], reply["error"]) == ("error", "permission_denied")
    commands = await http.post(f"{server.url}/threads/{thread_id}/commands", json={})
    assert commands.status_code == 401
    ws_url = f"{server.url.replace('http', 'ws')}/threads/{thread_id}/stream/events"
    wrong = thread_token("another-thread", secret=SECRET)
    async with websockets.connect(ws_url, additional_headers=_bearer(wrong)) as ws:
        reply = json.loads(await ws.recv())
        assert (reply["type"], reply["id"], reply["error"]) == ("error", None, "permission_denied")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


async def test_cors_lets_the_listed_origins_read_streams(
    server: Frontend, module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id = f"t-{uuid.uuid4().hex}"
    await append(aredis, module_prefix, [Topic("trace", trace_id)], conversation(TOKENS))
    token = stream_token(trace_id, secret=SECRET)
    preflight = await http.options(
        f"{server.url}/threads/{trace_id}/stream/events",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "last-event-id"} <= set(allowed.split(", "))
    url = f"{server.url}/traces/{trace_id}/stream?token={token}"
    async with http.stream("GET", url, headers={"Origin": ORIGIN}) as response:
        assert response.headers["access-control-allow-origin"] == ORIGIN
    async with http.stream("GET", url, headers={"Origin": "http://evil.example"}) as response:
        assert "access-control-allow-origin" not in response.headers
    # The EventSource route starts with a retry hint too: a browser is back within a second.
    got = await collect(http, "GET", url)
    assert (got.retry, got.ended, got.text()) == (1000, True, "".join(TOKENS))


async def test_commands_answer_with_protocol_responses(
    server: Frontend, http: httpx.AsyncClient
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    url = f"{server.url}/threads/{thread_id}/commands"
    auth = _bearer(thread_token(thread_id, secret=SECRET))

    async def send(command: Any) -> tuple[int, dict[str, Any]]:
        response = await http.post(url, content=json.dumps(command), headers=auth)
        return response.status_code, response.json()

    status, reply = await send({"id": 1, "method": "subscription.subscribe", "params": {}})
    assert (status, reply["type"], reply["id"], reply["error"]) == (
        200,
        "error",
        1,
        "invalid_argument",
    )
    subscribe = {"channels": ["messages"], "namespaces": [["research"]], "depth": 1}
    status, reply = await send({"id": 2, "method": "subscription.subscribe", "params": subscribe})
    assert (status, reply["type"], reply["id"]) == (200, "success", 2)
    sub_id = reply["result"]["subscription_id"]
    _, reply = await send(
        {"id": 3, "method": "subscription.unsubscribe", "params": {"subscription_id": sub_id}}
    )
    assert reply == {"type": "success", "id": 3, "result": {}}
    _, reply = await send(
        {"id": 4, "method": "subscription.unsubscribe", "params": {"subscription_id": "nope"}}
    )
    assert (reply["id"], reply["error"]) == (4, "no_such_subscription")
    for command_id, method in enumerate(["input.respond", "state.get", "state.fork"], 5):
        _, reply = await send({"id": command_id, "method": method, "params": {}})
        assert (reply["id"], reply["error"]) == (command_id, "not_supported"), method
    _, reply = await send({"id": 9, "method": "agent.getTree", "params": {}})
    assert (reply["id"], reply["error"]) == (9, "no_such_run")
    _, reply = await send({"id": 10, "method": "thread.delete", "params": {}})
    assert (reply["id"], reply["error"]) == (10, "unknown_command")
    status, reply = await send("not a command")
    assert (status, reply["type"], reply["id"], reply["error"]) == (
        400,
        "error",
        None,
        "invalid_argument",
    )
    bad = await http.post(
        f"{server.url}/threads/{thread_id}/stream/events", json={"channels": ["nope"]}, headers=auth
    )
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_argument"


async def test_each_websocket_subscription_replays_history_and_reconnect_resumes(
    server: Frontend, module_prefix: str, aredis: aioredis.Redis
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    events = conversation(TOKENS)
    await append(aredis, module_prefix, [Topic("thread", thread_id)], events[:6])
    ws_url = f"{server.url.replace('http', 'ws')}/threads/{thread_id}/stream/events"
    auth = _bearer(thread_token(thread_id, secret=SECRET))

    async def command(ws: Any, command_id: int, method: str, params: Any) -> dict[str, Any]:
        await ws.send(json.dumps({"id": command_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == command_id and reply["type"] != "event":
                return dict(reply)

    async def events_until(ws: Any, count: int) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < count:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "event":
                validate(frame)
                got.append(frame)
        return got

    async with websockets.connect(ws_url, additional_headers=auth) as ws:
        first = await command(ws, 1, "subscription.subscribe", {"channels": ["lifecycle"]})
        assert first["type"] == "success"
        [started] = await events_until(ws, 1)
        assert started["params"]["data"]["event"] == "started"
        # Subscribed later, it still gets the history it asks for.
        later = await command(ws, 2, "subscription.subscribe", {"channels": ["messages"]})
        assert later["type"] == "success"
        replayed = await events_until(ws, 5)
        assert [e["seq"] for e in replayed] == [2, 3, 4, 5, 6]
        sub_ids = [first["result"]["subscription_id"], later["result"]["subscription_id"]]
    await append(aredis, module_prefix, [Topic("thread", thread_id)], events[6:])
    async with websockets.connect(ws_url, additional_headers=auth) as ws:
        params = {"run_id": thread_id, "last_event_id": replayed[-1]["event_id"]}
        reply = await command(ws, 1, "subscription.reconnect", {**params, "subscriptions": sub_ids})
        assert reply["result"] == {"restored": True}
        rest = await events_until(ws, TOTAL - 6)
        assert [e["seq"] for e in rest] == list(range(7, TOTAL + 1))  # in order, once each
        gone = {**params, "last_event_id": "99999999999999-0", "subscriptions": sub_ids}
        reply = await command(ws, 2, "subscription.reconnect", gone)
        assert reply["result"] == {"restored": False}
