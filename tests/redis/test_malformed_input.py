"""Malformed input never gets a 500 or a cut stream: property tests against the real app.

The whole frontend app (streams, trace API, admin API) runs in this process
on the real Redis, behind httpx's ASGI transport. Hypothesis sends it tokens,
resume points and admin bodies; every answer must be a 2xx or a 4xx with a
JSON ``error`` message, and every stream must end with ``end`` or ``event:
error``. The app's own exceptions would surface here (the ASGI transport
re-raises them), so "no exception" is checked too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bus.frontend import create_app
from bus.history import Topic
from bus.settings import Settings
from bus.tokens import stream_token, thread_token
from tests.support.frontend import append, conversation

SECRET = "property-secret"
ADMIN = "property-admin-token"
TRACE = "t-prop"
THREAD = "th-prop"
PROPERTY = hsettings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Served:
    """The app with its lifespan running, in a loop of its own that each example reuses."""

    def __init__(self, settings: Settings) -> None:
        self.runner = asyncio.Runner()
        self.settings = settings
        self.runner.run(self._start())

    async def _start(self) -> None:
        self.redis = aioredis.Redis.from_url(self.settings.redis_url)
        self.app = create_app(self.settings, redis=self.redis)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        transport = httpx.ASGITransport(app=self.app)
        self.http = httpx.AsyncClient(transport=transport, base_url="http://app", timeout=30)
        events = conversation(["hello", " ", "world"])
        await append(self.redis, self.settings.prefix, [Topic("trace", TRACE)], events)
        await append(self.redis, self.settings.prefix, [Topic("thread", THREAD)], events)
        first: Any = await self.redis.xrange(Topic("trace", TRACE).history(self.keys), count=1)
        self.first_id = first[0][0].decode()

    @property
    def keys(self) -> Any:
        from bus.keys import Keys

        return Keys(self.settings.prefix)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.http.request(method, url, **kwargs))

    def close(self) -> None:
        async def stop() -> None:
            await self.http.aclose()
            await self._lifespan.__aexit__(None, None, None)
            await self.redis.aclose()

        self.runner.run(stop())
        self.runner.close()


@pytest.fixture
def served(settings: Settings) -> Iterator[Served]:
    app = Served(settings.replace(stream_secret=SECRET, admin_token=ADMIN))
    yield app
    app.close()


def _assert_answered(response: httpx.Response) -> None:
    """A 2xx, or a 4xx whose JSON body says what was wrong."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        message = response.json()["error"]
        assert isinstance(message, str) and message


def _assert_stream_ends(response: httpx.Response) -> list[dict[str, Any]]:
    """An SSE body that ends with an ``end`` or ``error`` frame; the events before it."""
    frames = [f for f in response.text.split("\n\n") if f and not f.startswith(":")]
    assert frames, "an empty stream"
    last = frames[-1].split("\n")
    kind = last[0] if last[0].startswith("event:") else last[1]
    assert kind in ("event: end", "event: error"), frames[-1]
    if kind == "event: error":
        body = json.loads(last[-1].removeprefix("data: "))
        assert body["code"] in ("events_missed", "invalid_position") and body["message"]
    return [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]


# Any character an HTTP client can send: lone surrogates cannot be encoded at all.
SENDABLE = st.characters(exclude_categories=["Cs"])
tokens = st.one_of(
    st.text(SENDABLE, max_size=80),
    st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=1, max_size=20),
    st.builds(
        lambda t, junk: t + junk, st.just(stream_token(TRACE, secret=SECRET)), st.text(SENDABLE)
    ),
    st.builds(
        lambda a, b: f"{a}.{b}", st.text(SENDABLE, max_size=30), st.text(SENDABLE, max_size=30)
    ),
)


@PROPERTY
@given(token=tokens)
def test_any_token_is_answered_with_a_2xx_or_4xx(served: Served, token: str) -> None:
    for url in (f"/traces/{TRACE}/stream", f"/traces/{TRACE}"):
        by_query = served.request("GET", url, params={"token": token})
        _assert_answered(by_query)
        assert by_query.status_code in (200, 401, 403, 404)  # 404: no run tree here
        try:
            header = {"Authorization": f"Bearer {token}".encode("latin-1").decode("latin-1")}
            by_header = served.request("GET", url, headers=header)
        except UnicodeEncodeError:
            continue  # not sendable in an HTTP header at all
        _assert_answered(by_header)
        assert by_header.status_code in (200, 401, 403, 404)


def test_non_ascii_tokens_are_refused_with_403(served: Served) -> None:
    full_width = "\uff54\uff4f\uff4b\uff45\uff4e"
    for token in ("é", full_width, stream_token(TRACE, secret=SECRET) + "é", "a.é"):
        response = served.request("GET", f"/traces/{TRACE}", params={"token": token})
        assert response.status_code == 403, token
        assert "malformed token" in response.json()["error"]


resume_points = st.one_of(
    st.sampled_from(["-", "+", "(", "(1-0", "[1-0", "0", "0-0", "1-", "-1", "1-2-3", " 1-0"]),
    st.text(SENDABLE, max_size=40),
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 2**70), st.integers(0, 2**70)),
    st.builds(lambda p, a: p + a, st.sampled_from(["(", "[", "+", "-"]), st.just("1-0")),
)


@PROPERTY
@given(point=resume_points)
def test_any_resume_point_is_answered_or_ends_the_stream_cleanly(
    served: Served, point: str
) -> None:
    token = stream_token(TRACE, secret=SECRET)
    url = f"/traces/{TRACE}/stream"
    for kwargs in (
        {"params": {"token": token, "lastEventID": point}},
        {"params": {"token": token}, "headers": {"Last-Event-ID": point}},
    ):
        try:
            response = served.request("GET", url, **kwargs)
        except UnicodeEncodeError:
            continue  # a header value httpx cannot send
        _assert_answered(response)
        if response.status_code == 200:
            _assert_stream_ends(response)
        elif point.strip():
            assert response.status_code == 400
            assert "is not an event id" in response.json()["error"]


@pytest.mark.parametrize("point", ["-", "+", "(1-0", "(", "x"])
def test_resume_points_redis_reads_specially_are_refused_with_400(
    served: Served, point: str
) -> None:
    token = stream_token(TRACE, secret=SECRET)
    response = served.request(
        "GET", f"/traces/{TRACE}/stream", params={"token": token, "lastEventID": point}
    )
    assert response.status_code == 400
    assert response.json() == {"error": f"Last-Event-ID {point!r} is not an event id (<ms>-<seq>)"}


def test_a_valid_resume_point_still_resumes_exactly(served: Served) -> None:
    token = stream_token(TRACE, secret=SECRET)
    response = served.request(
        "GET", f"/traces/{TRACE}/stream", params={"token": token, "lastEventID": served.first_id}
    )
    envelopes = _assert_stream_ends(response)
    assert [e["seq"] for e in envelopes] == list(range(2, len(conversation(["a"] * 3)) + 1))


@PROPERTY
@given(since=st.one_of(st.integers(-(2**70), 2**70), st.none()), point=resume_points)
def test_thread_stream_resume_points(served: Served, since: int | None, point: str) -> None:
    auth = f"Bearer {thread_token(THREAD, secret=SECRET)}"
    url = f"/threads/{THREAD}/stream"
    body = {"channels": ["messages"], "since": since}
    response = served.request("POST", url, json=body, headers={"Authorization": auth})
    _assert_answered(response)
    if response.status_code == 200:
        _assert_stream_ends(response)
    try:
        headers = {"Authorization": auth, "Last-Event-ID": point}
        resumed = served.request("POST", url, json={"channels": ["messages"]}, headers=headers)
    except UnicodeEncodeError:
        return
    _assert_answered(resumed)
    if resumed.status_code == 200:
        _assert_stream_ends(resumed)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
admin_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"grace_s": json_values, "secret": json_values}),
    st.fixed_dictionaries({}, optional={"since": json_values, "message_id": json_values}),
    st.fixed_dictionaries({}, optional={"reason": json_values}),
)
query_numbers = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "-1", "0", "1e400", "", "1.5", "10001", "x"]),
    st.text(SENDABLE, max_size=12),
    st.integers(-(2**70), 2**70).map(str),
)


def _admin(served: Served, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return served.request(method, f"/admin/webhooks{path}", headers=headers, **kwargs)


@pytest.fixture
def endpoint_id(served: Served) -> str:
    added = _admin(served, "POST", "/endpoints", json={"url": "https://93.184.216.34/hook"})
    assert added.status_code == 201, added.text
    ident: str = added.json()["id"]
    return ident


@PROPERTY
@given(body=admin_bodies)
def test_admin_bodies_get_2xx_or_4xx(served: Served, endpoint_id: str, body: Any) -> None:
    raw = json.dumps(body).encode()
    for path in (f"/endpoints/{endpoint_id}/rotate-secret", "/replay"):
        response = _admin(served, "POST", path, content=raw)
        _assert_answered(response)
    response = _admin(served, "POST", f"/endpoints/{endpoint_id}/disable", content=raw)
    _assert_answered(response)


@PROPERTY
@given(since=query_numbers, limit=query_numbers)
def test_admin_queries_get_2xx_or_4xx(
    served: Served, endpoint_id: str, since: str, limit: str
) -> None:
    for path, params in (
        ("/dead", {"since": since}),
        ("/dead", {"limit": limit}),
        ("/dead", {"since": since, "limit": limit}),
        (f"/endpoints/{endpoint_id}/attempts", {"limit": limit}),
    ):
        _assert_answered(_admin(served, "GET", path, params=params))


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "message"),
    [
        ("GET", "/dead", {"params": {"since": "inf"}}, "?since= must be a finite number >= 0"),
        ("GET", "/dead", {"params": {"since": "nan"}}, "?since= must be a finite number >= 0"),
        ("GET", "/dead", {"params": {"limit": "-1"}}, "?limit= must be an integer from 1"),
        ("POST", "/replay", {"json": {"since": []}}, "Expected `float | null`"),
        ("POST", "/replay", {"json": {"since": -5}}, "since must be a finite number >= 0"),
    ],
)
def test_admin_refusals_say_why(
    served: Served, method: str, path: str, kwargs: dict[str, Any], message: str
) -> None:
    response = _admin(served, method, path, **kwargs)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_rotate_secret_refuses_a_grace_that_is_not_a_number(
    served: Served, endpoint_id: str
) -> None:
    path = f"/endpoints/{endpoint_id}/rotate-secret"
    response = _admin(served, "POST", path, json={"grace_s": "x"})
    assert response.status_code == 400
    assert "Expected `float | null`, got `str` - at `$.grace_s`" in response.json()["error"]
    shown = _admin(served, "GET", f"/endpoints/{endpoint_id}")
    assert len(shown.json()["secrets"]) == 1  # nothing rotated
