"""``GET /traces`` and ``GET /traces/{id}``: access rules, filters, paging; and the merge rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from bus import events as ev
from bus.errors import InvalidQuery
from bus.settings import Settings
from bus.tokens import issue_token, stream_token
from bus.traces.aggregator import TraceAggregator
from bus.traces.queries import list_traces
from tests.support.publishing import run_event

SECRET = "s3cret"


def _trace_events(
    trace: str, *, name: str, tags: list[str], user: str, fail: bool = False
) -> list[ev.Event]:
    common = {"name": name, "run_type": "chain", "tags": tags, "metadata": {"user": user}}
    end = (
        run_event(ev.ChainError, trace, trace, 3, error="ValueError: no", error_type="ValueError")
        if fail
        else run_event(ev.ChainEnd, trace, trace, 3, outputs={"ok": 1})
    )
    return [run_event(ev.ChainStart, trace, trace, 1, inputs={"q": 1}, **common), end]


@pytest.fixture
async def client(
    settings: Settings, async_redis: aioredis.Redis
) -> AsyncIterator[httpx.AsyncClient]:
    from bus.traces.api import trace_routes

    cfg = settings.replace(stream_secret=SECRET)
    aggregator = TraceAggregator(redis=async_redis, settings=cfg)
    await aggregator.apply({"t1": _trace_events("t1", name="alpha", tags=["a"], user="u1")})
    await aggregator.apply(
        {"t2": _trace_events("t2", name="beta", tags=["b"], user="u2", fail=True)}
    )
    await aggregator.apply({"t3": _trace_events("t3", name="alpha", tags=["a", "b"], user="u2")})
    await aggregator.apply({"t4": _trace_events("t4", name="alpha", tags=["b"], user="u1")[:1]})
    app = Starlette(routes=trace_routes(cfg, async_redis))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_one_trace_needs_a_token_for_it(client: httpx.AsyncClient) -> None:
    assert (await client.get("/traces/t1")).status_code == 401
    other = stream_token("t2", secret=SECRET)
    assert (await client.get("/traces/t1", headers=_bearer(other))).status_code == 403
    forged = stream_token("t1", secret="not-the-secret")
    assert (await client.get("/traces/t1", headers=_bearer(forged))).status_code == 403
    expired = stream_token("t1", secret=SECRET, ttl_s=-5)
    assert (await client.get(f"/traces/t1?token={expired}")).status_code == 403

    token = stream_token("t1", secret=SECRET)
    reply = await client.get("/traces/t1", headers=_bearer(token))
    assert reply.status_code == 200
    body = reply.json()
    assert (body["trace_id"], body["status"], body["name"]) == ("t1", "success", "alpha")
    assert body["root"]["outputs"] == {"ok": 1}
    assert (await client.get(f"/traces/t1?token={token}")).status_code == 200
    missing = stream_token("nope", secret=SECRET)
    assert (await client.get("/traces/nope", headers=_bearer(missing))).status_code == 404


async def test_list_needs_the_star_scope(client: httpx.AsyncClient) -> None:
    assert (await client.get("/traces")).status_code == 401
    one = stream_token("t1", secret=SECRET)
    assert (await client.get("/traces", headers=_bearer(one))).status_code == 403
    star = issue_token("*", secret=SECRET)
    reply = await client.get("/traces", headers=_bearer(star))
    assert reply.status_code == 200
    assert [t["trace_id"] for t in reply.json()["traces"]] == ["t4", "t3", "t2", "t1"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=success", ["t3", "t1"]),
        ("status=error", ["t2"]),
        ("status=running", ["t4"]),
        ("name=alpha", ["t4", "t3", "t1"]),
        ("tag=b", ["t4", "t3", "t2"]),
        ("metadata=user%3Du2", ["t3", "t2"]),
        ("name=alpha&tag=b&metadata=user%3Du1", ["t4"]),
    ],
)
async def test_list_filters(client: httpx.AsyncClient, query: str, expected: list[str]) -> None:
    star = issue_token("*", secret=SECRET)
    reply = await client.get(f"/traces?{query}", headers=_bearer(star))
    assert [t["trace_id"] for t in reply.json()["traces"]] == expected


async def test_list_pages_with_a_cursor(client: httpx.AsyncClient) -> None:
    star = _bearer(issue_token("*", secret=SECRET))
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        reply = (await client.get(f"/traces?limit=3&cursor={cursor}", headers=star)).json()
        seen += [t["trace_id"] for t in reply["traces"]]
        cursor = reply["next_cursor"]
        if cursor is None:
            break
    assert seen == ["t4", "t3", "t2", "t1"]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("cursor=garbage", "bad trace list cursor: 'garbage'"),
        ("cursor=1.5", "bad trace list cursor: '1.5'"),
        ("metadata=novalue", "metadata takes KEY=VALUE, got 'novalue'"),
        ("limit=0", "limit must be between 1 and 1000, got 0"),
        ("limit=1001", "limit must be between 1 and 1000, got 1001"),
        ("limit=ten", "limit must be a whole number, got 'ten'"),
    ],
)
async def test_a_bad_list_query_is_a_400(
    client: httpx.AsyncClient, query: str, reason: str
) -> None:
    star = _bearer(issue_token("*", secret=SECRET))
    reply = await client.get(f"/traces?{query}", headers=star)
    assert (reply.status_code, reply.json()) == (400, {"error": reason})


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"cursor": "nan:t1"}, "bad trace list cursor: 'nan:t1'"),
        ({"limit": 0}, "limit must be between 1 and 1000, got 0"),
    ],
)
async def test_list_traces_raises_invalid_query(
    settings: Settings, async_redis: aioredis.Redis, kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidQuery) as raised:
        await list_traces(async_redis, settings, **kwargs)
    assert str(raised.value) == reason


async def test_open_access_skips_checks(settings: Settings, async_redis: aioredis.Redis) -> None:
    from bus.traces.api import trace_routes

    app = Starlette(routes=trace_routes(settings.replace(open_access=True), async_redis))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert (await http.get("/traces")).json() == {"traces": [], "next_cursor": None}
        assert (await http.get("/traces/x")).status_code == 404


async def test_equal_scores_page_without_loss(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    aggregator = TraceAggregator(redis=async_redis, settings=settings)
    # One batch: every trace gets the same index score.
    await aggregator.apply(
        {f"t{i}": _trace_events(f"t{i}", name="n", tags=[], user="u") for i in range(7)}
    )
    seen: list[str] = []
    cursor = None
    while True:
        page = await list_traces(async_redis, settings, limit=2, cursor=cursor)
        seen += [t.trace_id for t in page.traces]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == [f"t{i}" for i in range(7)] and len(seen) == 7
