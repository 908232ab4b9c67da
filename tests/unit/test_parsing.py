"""The small parsers shared by the stages, the HTTP APIs and the CLI."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from bus.access import bearer_token, error_response, token_of
from bus.errors import InvalidQuery
from bus.parsing import entry_order, key_values, text


def test_text_of_redis_replies() -> None:
    assert [text(b"caf\xc3\xa9"), text("tea"), text(7)] == ["café", "tea", "7"]


def test_entry_order_sorts_ids_as_numbers() -> None:
    ids = ["10-0", b"9-12", "9-2", "1700000000000"]
    assert sorted(ids, key=entry_order) == ["9-2", b"9-12", "10-0", "1700000000000"]
    assert entry_order(b"5-3") == (5, 3) and entry_order("5") == (5, 0)


def test_key_values() -> None:
    assert key_values(["user=u1", "plan=a=b", "empty="], option="--metadata") == {
        "user": "u1",
        "plan": "a=b",
        "empty": "",
    }
    for bad in ("novalue", "=v"):
        with pytest.raises(InvalidQuery) as raised:
            key_values(["ok=1", bad], option="--metadata")
        assert str(raised.value) == f"--metadata takes KEY=VALUE, got {bad!r}"


def _request(query: str = "", authorization: str | None = None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "query_string": query.encode(), "headers": headers})


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        ("Bearer", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(_request(authorization=header)) == token


def test_query_token_comes_before_the_header() -> None:
    assert token_of(_request("token=q", "Bearer h")) == "q"
    assert token_of(_request("token=", "Bearer h")) == "h"


def test_error_response() -> None:
    response = error_response(403, "wrong admin token")
    assert (response.status_code, response.body) == (403, b'{"error":"wrong admin token"}')
    assert response.headers["content-type"] == "application/json"
