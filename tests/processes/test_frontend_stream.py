"""Streaming frontends as real processes: two ``lcbus serve`` against one Redis.

History is produced with :class:`HistoryWriter` (what the fan-out worker
uses), so these tests pin the frontends' side of the contract: every client
gets every event once and in order, resumes are exact, misses are reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import websockets

from bus.history import Topic
from bus.keys import Keys
from bus.settings import Settings
from bus.tokens import issue_token, stream_token, thread_token
from tests.conftest import REDIS_URL, require_redis
from tests.support.frontend import (
    SECRET,
    Frontend,
    Received,
    append,
    collect,
    conversation,
    frontend,
    validate,
)
from tests.support.processes import ROOT, start_worker, stop

TOKENS = [f"tok{i} " for i in range(120)]
EXPECTED = "".join(TOKENS)
QUEUE = 256


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
def frontends(module_prefix: str) -> Iterator[list[Frontend]]:
    # A long stall bound: the slow client below resumes reading after the others are done.
    env = {
        "LCBUS_CLIENT_QUEUE_SIZE": str(QUEUE),
        "LCBUS_PING_INTERVAL_S": "1",
        "LCBUS_CLIENT_STALL_S": "60",
    }
    with (
        frontend(REDIS_URL, module_prefix, **env) as a,
        frontend(REDIS_URL, module_prefix, **env) as b,
    ):
        yield [a, b]


@pytest.fixture
async def aredis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        yield client


def _trace_url(server: Frontend, trace_id: str, **query: str) -> str:
    params = {"token": stream_token(trace_id, secret=SECRET), **query}
    return f"{server.url}/traces/{trace_id}/stream?{httpx.QueryParams(params)}"


def _ws_url(server: Frontend, thread_id: str) -> str:
    token = thread_token(thread_id, secret=SECRET)
    return f"{server.url.replace('http', 'ws')}/threads/{thread_id}/stream?token={token}"


def _assert_complete(got: Received, total: int) -> None:
    assert got.error is None
    assert got.seqs == list(range(1, total + 1))
    assert got.text() == EXPECTED
    for envelope in got.envelopes:
        validate(envelope)


async def _ws_collect(url: str, thread_id: str, ready: asyncio.Event) -> Received:
    got = Received()
    async with websockets.connect(url) as ws:
        params = {"channels": ["messages", "lifecycle"]}
        await ws.send(json.dumps({"id": 1, "method": "subscription.subscribe", "params": params}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "success" and reply["id"] == 1
        assert reply["result"]["subscription_id"]
        ready.set()
        async for message in ws:
            got.envelopes.append(json.loads(message))
        got.ended = ws.close_code == 1000
    return got


async def test_every_client_on_two_frontends_gets_every_event_in_order(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id, thread_id = f"t-{uuid.uuid4().hex}", f"th-{uuid.uuid4().hex}"
    events = conversation(TOKENS)
    started = [asyncio.Event() for _ in range(21)]
    sse = [
        asyncio.create_task(
            collect(http, "GET", _trace_url(frontends[i % 2], trace_id), started=started[i])
        )
        for i in range(20)
    ]
    ws = asyncio.create_task(_ws_collect(_ws_url(frontends[1], thread_id), thread_id, started[20]))
    await asyncio.gather(*(event.wait() for event in started))
    topics = [Topic("trace", trace_id), Topic("thread", thread_id)]
    await append(aredis, module_prefix, topics, events[:10])
    await append(aredis, module_prefix, topics, events[10:], batch=4)

    for got in await asyncio.gather(*sse):
        _assert_complete(got, len(events))
        assert got.ended
    ws_got = await ws
    _assert_complete(ws_got, len(events))
    assert ws_got.ended

    late = await collect(http, "GET", _trace_url(frontends[0], trace_id))
    _assert_complete(late, len(events))
    assert late.ended
    # Every client left: both processes dropped every channel they had subscribed.
    health = [server.health() for server in frontends]
    assert [h["channels"] for h in health] == [0, 0]
    # Live events went to waiting clients straight from the hub's read loop.
    assert all(h["live_sent_at_once"] > 0 for h in health)


async def test_cut_client_resumes_with_exactly_the_missing_events(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id = f"t-{uuid.uuid4().hex}"
    events = conversation(TOKENS)
    topics = [Topic("trace", trace_id)]
    await append(aredis, module_prefix, topics, events[:50])
    first = await collect(http, "GET", _trace_url(frontends[0], trace_id), limit=30)
    assert first.seqs == list(range(1, 31))

    await append(aredis, module_prefix, topics, events[50:])
    header = {"Last-Event-ID": first.ids[-1]}
    rest = await collect(http, "GET", _trace_url(frontends[1], trace_id), headers=header)
    assert rest.seqs == list(range(31, len(events) + 1))
    assert rest.ended
    whole = Received(envelopes=first.envelopes + rest.envelopes)
    _assert_complete(whole, len(events))

    by_query = _trace_url(frontends[0], trace_id, lastEventID=first.ids[9])
    again = await collect(http, "GET", by_query)
    assert again.seqs == list(range(11, len(events) + 1))
    # A client reconnecting after the end is told so at once, with nothing repeated.
    after_end = await collect(
        http, "GET", _trace_url(frontends[0], trace_id, lastEventID=rest.ids[-1])
    )
    assert after_end.envelopes == [] and after_end.ended


async def test_client_behind_trimmed_history_is_told_it_missed_events(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id, thread_id = f"t-{uuid.uuid4().hex}", f"th-{uuid.uuid4().hex}"
    events = conversation(TOKENS)
    topics = [Topic("trace", trace_id), Topic("thread", thread_id)]
    await append(aredis, module_prefix, topics[:1], events[:20])
    early = await collect(http, "GET", _trace_url(frontends[0], trace_id), limit=5)
    await append(aredis, module_prefix, topics[:1], events[20:])
    await append(aredis, module_prefix, topics[1:], events)
    keys = Keys(module_prefix)
    for topic in topics:
        await aredis.xtrim(topic.history(keys), maxlen=20, approximate=False)

    header = {"Last-Event-ID": early.ids[-1]}
    missed = await collect(http, "GET", _trace_url(frontends[1], trace_id), headers=header)
    assert missed.envelopes == []
    assert missed.error is not None and missed.error["code"] == "events_missed"

    token = {"Authorization": f"Bearer {thread_token(thread_id, secret=SECRET)}"}
    url = f"{frontends[0].url}/threads/{thread_id}/stream"
    body = {"channels": ["messages"], "since": 3}
    by_seq = await collect(http, "POST", url, json=body, headers=token)
    assert by_seq.error is not None and by_seq.error["code"] == "events_missed"

    async with websockets.connect(_ws_url(frontends[1], thread_id)) as ws:
        params = {"run_id": thread_id, "last_event_id": early.ids[-1]}
        await ws.send(json.dumps({"id": 7, "method": "subscription.reconnect", "params": params}))
        reply = json.loads(await ws.recv())
    assert reply == {"type": "success", "id": 7, "result": {"restored": False}}

    # A fresh client gets what history still holds, with no error.
    fresh = await collect(http, "GET", _trace_url(frontends[0], trace_id))
    assert fresh.error is None and fresh.ended
    assert fresh.seqs == list(range(len(events) - 19, len(events) + 1))


async def test_slow_client_is_dropped_without_delaying_the_others(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    from httpx_sse import aconnect_sse

    trace_id = f"t-{uuid.uuid4().hex}"
    # Big events: the slow client's socket buffers fill, then its bounded queue overflows.
    tokens = [f"{i:06d}" + "x" * 4000 for i in range(3000)]
    events = conversation(tokens)
    started = asyncio.Event()
    fast = asyncio.create_task(
        collect(http, "GET", _trace_url(frontends[0], trace_id), started=started)
    )
    async with aconnect_sse(http, "GET", _trace_url(frontends[0], trace_id)) as slow:
        await started.wait()
        lines = slow.response.aiter_lines()
        await append(aredis, module_prefix, [Topic("trace", trace_id)], events, batch=50)
        got = await fast
        assert got.error is None and got.ended
        assert got.seqs == list(range(1, len(events) + 1))
        assert got.text() == "".join(tokens)
        # Only now does the slow client read: what it gets ends with the reason it was dropped.
        tail = [line async for line in lines if line.startswith(("event:", 'data: {"code'))]
    assert tail[-2:] == ["event: error", tail[-1]]
    assert json.loads(tail[-1].removeprefix("data: "))["code"] == "slow_consumer"


async def test_tokens_are_required_and_scoped(
    frontends: list[Frontend], http: httpx.AsyncClient
) -> None:
    base = frontends[0].url
    trace_id = f"t-{uuid.uuid4().hex}"
    url = f"{base}/traces/{trace_id}/stream"

    async def status(**kwargs: Any) -> int:
        async with http.stream("GET", url, **kwargs) as response:
            return response.status_code

    assert await status() == 401
    assert await status(params={"token": "garbage"}) == 403
    assert await status(params={"token": stream_token("other", secret=SECRET)}) == 403
    assert await status(params={"token": stream_token(trace_id, secret="wrong")}) == 403
    assert await status(params={"token": stream_token(trace_id, secret=SECRET, ttl_s=-5)}) == 403
    thread_scope = thread_token(trace_id, secret=SECRET)
    assert await status(headers={"Authorization": f"Bearer {thread_scope}"}) == 403
    everything = issue_token("*", secret=SECRET)
    assert await status(headers={"Authorization": f"Bearer {everything}"}) == 200

    post = await http.post(f"{base}/threads/x/stream", json={"channels": ["messages"]})
    assert post.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{base.replace('http', 'ws')}/threads/x/stream"):
            pass
    assert refused.value.response.status_code == 401
    other = thread_token("y", secret=SECRET)
    with pytest.raises(websockets.InvalidStatus) as wrong:
        async with websockets.connect(
            f"{base.replace('http', 'ws')}/threads/x/stream?token={other}"
        ):
            pass
    assert wrong.value.response.status_code == 403


async def test_bad_requests_get_clear_errors(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    auth = {"Authorization": f"Bearer {thread_token(thread_id, secret=SECRET)}"}
    url = f"{frontends[0].url}/threads/{thread_id}/stream"
    for body in ({"channels": ["nope"]}, {"depth": 1}, {"channels": ["messages"], "depth": -1}):
        response = await http.post(url, json=body, headers=auth)
        assert response.status_code == 400, body
        assert "invalid EventStreamRequest" in response.json()["error"]
    bad_id = await http.get(_trace_url(frontends[0], "t-x", lastEventID="not-an-id"))
    assert bad_id.status_code == 400
    assert bad_id.json() == {"error": "Last-Event-ID 'not-an-id' is not an event id (<ms>-<seq>)"}

    async with websockets.connect(_ws_url(frontends[0], thread_id)) as ws:
        for command, code in [
            ("not json", "invalid_argument"),
            (json.dumps({"id": 1, "method": "run.start", "params": {}}), "unknown_command"),
            (
                json.dumps({"id": 2, "method": "subscription.subscribe", "params": {}}),
                "invalid_argument",
            ),
            (
                json.dumps(
                    {
                        "id": 3,
                        "method": "subscription.unsubscribe",
                        "params": {"subscription_id": "s"},
                    }
                ),
                "no_such_subscription",
            ),
        ]:
            await ws.send(command)
            reply = json.loads(await ws.recv())
            assert reply["type"] == "error" and reply["error"] == code, reply
        # Resume points Redis would read as range syntax: an error to that command only.
        for n, point in enumerate(["-", "+", "(1-0", "é"], start=10):
            params = {"run_id": thread_id, "last_event_id": point}
            await ws.send(
                json.dumps({"id": n, "method": "subscription.reconnect", "params": params})
            )
            reply = json.loads(await ws.recv())
            assert reply == {
                "type": "error",
                "id": n,
                "error": "invalid_argument",
                "message": f"last_event_id {point!r} is not an event id",
            }
        # The session is still usable after all of them.
        subscribe = {
            "id": 20,
            "method": "subscription.subscribe",
            "params": {"channels": ["tools"]},
        }
        await ws.send(json.dumps(subscribe))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "success" and reply["id"] == 20


async def test_websocket_filters_and_reconnect_on_another_frontend(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis
) -> None:
    thread_id = f"th-{uuid.uuid4().hex}"
    topic = Topic("thread", thread_id)
    outer = conversation(TOKENS[:5])[:-1]  # not final: the thread goes on
    inner = conversation(TOKENS[5:10], namespace=["agent", "tool:1"])
    await append(aredis, module_prefix, [topic], outer + inner)
    sub = {"channels": ["messages"], "namespaces": [["agent"]], "depth": 1}
    async with websockets.connect(_ws_url(frontends[0], thread_id)) as ws:
        await ws.send(json.dumps({"id": 1, "method": "subscription.subscribe", "params": sub}))
        reply = json.loads(await ws.recv())
        sub_id = reply["result"]["subscription_id"]
        first = [json.loads(await ws.recv()) for _ in range(3)]
    assert [e["params"]["namespace"] for e in first] == [["agent", "tool:1"]] * 3
    assert all(e["method"] == "messages" for e in first)

    async with websockets.connect(_ws_url(frontends[1], thread_id)) as ws:
        params = {
            "run_id": thread_id,
            "last_event_id": first[-1]["event_id"],
            "subscriptions": [sub_id],
        }
        await ws.send(json.dumps({"id": 2, "method": "subscription.reconnect", "params": params}))
        assert json.loads(await ws.recv()) == {
            "type": "success",
            "id": 2,
            "result": {"restored": True},
        }
        rest = [json.loads(message) async for message in ws]
        assert ws.close_code == 1000
    got = Received(envelopes=first + rest)
    assert got.text() == "".join(TOKENS[5:10])
    assert [e["seq"] for e in got.envelopes] == list(range(len(outer) + 2, len(outer) + len(inner)))


async def test_clients_lose_nothing_when_the_pubsub_connection_drops(
    frontends: list[Frontend], module_prefix: str, aredis: aioredis.Redis, http: httpx.AsyncClient
) -> None:
    trace_id = f"t-{uuid.uuid4().hex}"
    events = conversation(TOKENS)
    topic = Topic("trace", trace_id)
    started = [asyncio.Event() for _ in range(4)]
    clients = [
        asyncio.create_task(
            collect(http, "GET", _trace_url(frontends[i % 2], trace_id), started=started[i])
        )
        for i in range(4)
    ]
    await asyncio.gather(*(event.wait() for event in started))
    before = frontends[0].health()["pubsub_reconnects"]
    await append(aredis, module_prefix, [topic], events[:40])
    hub = f"{module_prefix}:frontend-hub:{frontends[0].process.pid}"
    hub_ids = [c["id"] for c in await aredis.client_list() if c.get("name") == hub]
    assert len(hub_ids) == 1
    await aredis.execute_command("CLIENT", "KILL", "ID", hub_ids[0])
    # Published while that frontend had no subscription: only history has these.
    await append(aredis, module_prefix, [topic], events[40:])
    for got in await asyncio.gather(*clients):
        _assert_complete(got, len(events))
    assert frontends[0].health()["pubsub_reconnects"] > before


async def _ws_until_root_completed(url: str, ready: asyncio.Event) -> Received:
    """A thread has no final event: read until the root run's lifecycle completes."""
    got = Received()
    async with websockets.connect(url) as ws:
        params = {"channels": ["messages", "lifecycle", "tools", "custom"]}
        await ws.send(json.dumps({"id": 1, "method": "subscription.subscribe", "params": params}))
        assert json.loads(await ws.recv())["type"] == "success"
        ready.set()
        async for message in ws:
            envelope = json.loads(message)
            got.envelopes.append(envelope)
            params = envelope["params"]
            if params["namespace"] == [] and params["data"].get("event") == "completed":
                break
    return got


async def test_full_chain_app_fanout_worker_two_frontends(
    frontends: list[Frontend],
    module_prefix: str,
    http: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    """App process -> handler -> Redis -> fan-out worker (arq) -> two frontends -> 21 clients."""
    settings = Settings(redis_url=REDIS_URL, prefix=module_prefix, partitions=4)
    trace_id, thread_id = str(uuid.uuid4()), f"th-{uuid.uuid4().hex}"
    text = " ".join(f"word{i}" for i in range(150))
    worker = start_worker(settings, tmp_path / "fanout.log", target="workers.fanout.WorkerSettings")
    try:
        started = [asyncio.Event() for _ in range(21)]
        sse = [
            asyncio.create_task(
                collect(http, "GET", _trace_url(frontends[i % 2], trace_id), started=started[i])
            )
            for i in range(20)
        ]
        ws = asyncio.create_task(
            _ws_until_root_completed(_ws_url(frontends[0], thread_id), started[20])
        )
        await asyncio.gather(*(event.wait() for event in started))
        env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env()}
        app = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.chat_app",
            trace_id,
            thread_id,
            text,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await app.communicate()
        assert app.returncode == 0 and output.decode().strip() == text
        results = await asyncio.wait_for(asyncio.gather(*sse, ws), timeout=60)
    finally:
        stop(worker, signal.SIGTERM)
    reference = results[0]
    assert reference.ended and reference.text() == text
    for got in results:
        assert got.error is None
        assert got.seqs == list(range(1, len(got.seqs) + 1))
        assert got.text() == text
        for envelope in got.envelopes:
            validate(envelope)
    for got in results[:20]:
        assert got.seqs == reference.seqs and got.ended
