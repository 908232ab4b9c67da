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

from bus.producer.sanitize import REDACTED, safe, safe_str

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
