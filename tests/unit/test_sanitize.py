"""Arbitrary payloads become bounded JSON-safe values; secrets never leave."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any

import msgspec
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel, SecretStr

from bus.producer.sanitize import REDACTED, redact_text, safe, safe_str

LIMIT = 64 * 1024


def json_size(value: Any) -> int:
    return len(msgspec.json.encode(value))


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class Config(BaseModel):
    model: str
    api_key: SecretStr


@dataclasses.dataclass
class Point:
    x: int
    label: str


def test_langchain_objects_become_plain_data() -> None:
    value = safe(
        {
            "messages": [HumanMessage("hi"), AIMessage("yo")],
            "doc": Document(page_content="text", metadata={"page": 1}),
            "point": Point(1, "a"),
            "when": dt.datetime(2026, 1, 2, 3, 4, 5),
            "id": uuid.UUID(int=1),
            "set": {3},
            "obj": object(),
            "broken": Unprintable(),
            1: "int key",
        },
        max_bytes=LIMIT,
    )
    assert value["messages"][0]["content"] == "hi" and value["messages"][1]["type"] == "ai"
    assert value["doc"]["page_content"] == "text" and value["doc"]["metadata"] == {"page": 1}
    assert value["point"] == {"x": 1, "label": "a"}
    assert value["when"] == "2026-01-02T03:04:05"
    assert value["id"] == str(uuid.UUID(int=1))
    assert value["set"] == [3]
    assert value["obj"].startswith("<object object")
    assert value["broken"] == "<unrepresentable Unprintable>"
    assert value["1"] == "int key"
    msgspec.json.encode(value)  # JSON-safe all the way down


def test_ten_megabyte_input_is_truncated_with_a_marker() -> None:
    value = safe({"input": "x" * 10_000_000}, max_bytes=LIMIT)
    assert json_size(value) < LIMIT + 512
    assert value["input"].endswith("bytes]") and "truncated" in value["input"]
    many = safe(list(range(1_000_000)), max_bytes=LIMIT)
    assert json_size(many) < LIMIT + 512
    assert many[-1].startswith("[truncated")


def test_deep_and_cyclic_structures_terminate() -> None:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(10_000):
        cursor["next"] = {}
        cursor = cursor["next"]
    assert "[max depth]" in msgspec.json.encode(safe(deep, max_bytes=LIMIT)).decode()
    loop: list[Any] = [1]
    loop.append(loop)
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    assert safe(loop, max_bytes=LIMIT) == [1, "[cycle]"]
    assert safe(mapping, max_bytes=LIMIT) == {"self": "[cycle]"}
    shared = [1]
    assert safe([shared, shared], max_bytes=LIMIT) == [[1], [1]]  # sharing is not a cycle


def test_non_utf8_bytes_are_kept_readable() -> None:
    assert safe(b"ok \xff\xfe", max_bytes=LIMIT) == "ok \\xff\\xfe"
    assert safe_str("é" * 100, max_bytes=11).startswith("ééééé…[truncated")


def test_secrets_are_redacted() -> None:
    value = safe(
        {
            "config": Config(model="m", api_key=SecretStr("sk-secret")),
            "openai_api_key": "sk-secret",
            "headers": {"Authorization": "Bearer sk-secret", "Accept": "json"},
            "password": "hunter2",
            "max_tokens": 5,
            "usage": {"total_tokens": 7},
        },
        max_bytes=LIMIT,
    )
    text = msgspec.json.encode(value).decode()
    assert "sk-secret" not in text and "hunter2" not in text
    assert value["config"]["api_key"] == REDACTED
    assert value["headers"] == {"Authorization": REDACTED, "Accept": "json"}
    assert value["max_tokens"] == 5 and value["usage"] == {"total_tokens": 7}


def test_keys_named_like_credentials_and_header_pairs_are_redacted() -> None:
    value = safe(
        {
            "github_token": "ghp-1",
            "openai_key": "ok-2",
            "x-api-key": "xk-3",
            "hfToken": "hf-4",
            "client_secret": "cs-5",
            "token": "t-6",
            "headers": [("Authorization", "Bearer b-7"), ("Accept", "json")],
            "raw_headers": [[b"Cookie", b"c-8"]],
            "max_tokens": 5,
            "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
            "token_count": 4,
            "key": "a dictionary key, not a credential",
        },
        max_bytes=LIMIT,
    )
    assert value == {
        "github_token": REDACTED,
        "openai_key": REDACTED,
        "x-api-key": REDACTED,
        "hfToken": REDACTED,
        "client_secret": REDACTED,
        "token": REDACTED,
        "headers": [["Authorization", REDACTED], ["Accept", "json"]],
        "raw_headers": [["Cookie", REDACTED]],
        "max_tokens": 5,
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
        "token_count": 4,
        "key": "a dictionary key, not a credential",
    }


def test_credentials_quoted_in_free_text_are_redacted() -> None:
    assert (
        redact_text("{'query': 'q', 'api_key': 'sk-1'}")
        == f"{{'query': 'q', 'api_key': '{REDACTED}'}}"
    )
    assert redact_text('{"password": "hunter2", "n": 1}') == f'{{"password": "{REDACTED}", "n": 1}}'
    assert redact_text("github_token=abc max_tokens=5") == f"github_token={REDACTED} max_tokens=5"
    assert redact_text("Authorization: Bearer abc.def") == f"Authorization: {REDACTED}"
    assert redact_text("sent Bearer abcdefgh to it") == f"sent Bearer {REDACTED} to it"
    leaked = "Incorrect API key provided: sk-proj-abcdefghijklmnop1234."
    assert redact_text(leaked) == f"Incorrect API key provided: {REDACTED}."
    assert redact_text("nothing here: x=1, y: two") == "nothing here: x=1, y: two"
