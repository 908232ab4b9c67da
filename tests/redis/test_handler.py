"""The handler publishes the complete, correctly nested event sequence of real chains."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import msgspec
import pytest
import redis
from langchain_core.runnables import RunnableLambda
from pydantic import SecretStr

from bus import BusCallbackHandler, Keys, Settings, decode
from bus import events as ev
from tests.support.chains import ANSWER, build_chain
from tests.support.published import by_trace, check_trace, read_all


def types_of(events: list[ev.Event]) -> set[str]:
    return {ev.event_type(e) for e in events}


EXPECTED_TYPES = {
    "on_chain_start",
    "on_chain_end",
    "on_retriever_start",
    "on_retriever_end",
    "on_custom_event",
    "on_chat_model_start",
    "on_llm_new_token",
    "on_llm_end",
    "on_tool_start",
    "on_tool_end",
}


def assert_complete_run(events: list[ev.Event], root: str) -> None:
    check_trace(events, root)
    assert types_of(events) >= EXPECTED_TYPES
    tokens = [e.token for e in events if isinstance(e, ev.LLMNewToken)]
    assert "".join(tokens) == ANSWER
    model_end = next(e for e in events if isinstance(e, ev.LLMEnd))
    assert model_end.text == ANSWER
    custom = next(e for e in events if isinstance(e, ev.CustomEvent))
    assert (custom.event_name, custom.data) == ("progress", {"step": "retrieved"})
    retriever_end = next(e for e in events if isinstance(e, ev.RetrieverEnd))
    assert retriever_end.documents[0]["page_content"] == "notes about what moves tokens?"
    names = {e.name for e in events if isinstance(e, ev.RunStart)}
    assert {"ChatPromptTemplate", "GenericFakeChatModel", "StrOutputParser", "word_count"} <= names
    run_types = {e.run_type for e in events if isinstance(e, ev.RunStart)}
    assert {"chain", "prompt", "parser", "chat_model", "tool", "retriever"} <= run_types


def test_sync_stream_publishes_complete_nested_sequence(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    chunks = list(
        build_chain().stream("what moves tokens?", config={"callbacks": [handler], "run_id": root})
    )
    assert chunks
    assert handler.publisher.flush(5)
    assert handler.failures == 0
    traces = by_trace(read_all(sync_redis, settings))
    assert list(traces) == [str(root)]
    assert_complete_run(traces[str(root)], str(root))
    handler.close()


async def test_async_runs_publish_independent_traces(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    handler = BusCallbackHandler(settings=settings)
    chain = build_chain()
    roots = [uuid.uuid4() for _ in range(3)]
    for root in roots:
        async for _ in chain.astream(
            "what moves tokens?", config={"callbacks": [handler], "run_id": root}
        ):
            pass
    assert handler.publisher.flush(5)
    traces = by_trace(read_all(sync_redis, settings))
    assert set(traces) == {str(r) for r in roots}
    for root in roots:
        assert_complete_run(traces[str(root)], str(root))
    handler.close()


def test_trace_lives_on_one_partition(settings: Settings, sync_redis: redis.Redis) -> None:
    handler = BusCallbackHandler(settings=settings)
    chain = build_chain()
    roots = [uuid.uuid4() for _ in range(8)]
    for root in roots:
        chain.invoke("q", config={"callbacks": [handler], "run_id": root})
    assert handler.publisher.flush(5)
    keys = Keys(settings.prefix)
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for partition in range(settings.partitions):
        for _, fields in sync_redis.xrange(keys.events(partition)):
            partitions_of[decode(fields[b"e"]).trace_id].add(partition)
    assert set(partitions_of) == {str(r) for r in roots}
    assert all(len(p) == 1 for p in partitions_of.values())
    handler.close()


def test_error_branch_is_published(settings: Settings, sync_redis: redis.Redis) -> None:
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    with pytest.raises(ValueError, match="cannot handle"):
        build_chain(failing_tool=True).invoke("q", config={"callbacks": [handler], "run_id": root})
    assert handler.publisher.flush(5)
    events = by_trace(read_all(sync_redis, settings))[str(root)]
    check_trace(events, str(root))
    errors = [e for e in events if isinstance(e, ev.ToolError | ev.ChainError)]
    assert any(isinstance(e, ev.ToolError) and "cannot handle" in e.error for e in errors)
    root_error = next(e for e in errors if e.run_id == str(root))
    assert root_error.error_type == "ValueError"
    handler.close()


def test_handler_attached_to_the_chain(settings: Settings, sync_redis: redis.Redis) -> None:
    handler = BusCallbackHandler(settings=settings)
    chain = build_chain().with_config(callbacks=[handler])
    chain.invoke("what moves tokens?")
    assert handler.publisher.flush(5)
    traces = by_trace(read_all(sync_redis, settings))
    assert len(traces) == 1
    [(root, events)] = traces.items()
    check_trace(events, root)
    handler.close()


def test_run_fields_ride_on_run_events_and_not_on_tokens(
    settings: Settings, sync_redis: redis.Redis
) -> None:
    handler = BusCallbackHandler(settings=settings)
    metadata = {"thread_id": "t-1", "openai_api_key": "sk-live-123", "blob": "m" * 50_000}
    config: Any = {"callbacks": [handler], "tags": ["demo"], "metadata": metadata}
    assert list(build_chain().stream("q", config=config))
    assert handler.publisher.flush(5)
    events = read_all(sync_redis, settings)
    tokens = [e for e in events if isinstance(e, ev.LLMNewToken)]
    others = [e for e in events if not isinstance(e, ev.LLMNewToken)]
    assert len(tokens) > 10 and others
    assert all("demo" in e.tags for e in others)
    assert all(e.metadata.get("thread_id") == "t-1" for e in others)
    assert all(e.metadata.get("openai_api_key") == "[redacted]" for e in others)
    # A token carries its run's identity, not the run's name, tags and 50 KB of metadata.
    assert all((e.name, e.tags, e.metadata) == ("", [], {}) for e in tokens)
    assert all(e.run_type == "chat_model" and e.run_id for e in tokens)
    assert max(len(ev.encode(e)) for e in tokens) < 300
    handler.close()


def test_a_token_event_of_an_older_producer_still_decodes() -> None:
    """Older producers repeated the run's fields on every token: those still decode."""
    old = {
        "type": "on_llm_new_token",
        "id": "e1",
        "time": 1.0,
        "run_id": "r",
        "trace_id": "r",
        "seq": 3,
        "name": "model",
        "tags": ["demo"],
        "metadata": {"thread_id": "t-1"},
        "token": "hi",
    }
    event = decode(msgspec.msgpack.encode(old))
    assert isinstance(event, ev.LLMNewToken)
    assert (event.name, event.tags, event.metadata, event.token) == (
        "model",
        ["demo"],
        {"thread_id": "t-1"},
        "hi",
    )


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_handler_survives_hostile_inputs(settings: Settings, sync_redis: redis.Redis) -> None:
    handler = BusCallbackHandler(settings=settings.replace(max_field_bytes=4096))
    loop: list[Any] = []
    loop.append(loop)
    hostile = {
        "big": "y" * 10_000_000,
        "loop": loop,
        "raw": b"\x80\x81",
        "thing": Unprintable(),
        "api_key": SecretStr("sk-very-secret"),
        "token": "sk-also-secret",
    }
    echo = RunnableLambda(lambda x: x)
    echo.invoke(hostile, config={"callbacks": [handler]})
    assert handler.publisher.flush(5)
    assert handler.failures == 0
    keys = Keys(settings.prefix)
    payloads = [
        fields[b"e"]
        for p in range(settings.partitions)
        for _, fields in sync_redis.xrange(keys.events(p))
    ]
    assert len(payloads) == 2  # chain start and chain end
    for payload in payloads:
        assert len(payload) < 4 * 4096
        assert b"sk-very-secret" not in payload
    start = next(e for e in map(decode, payloads) if isinstance(e, ev.ChainStart))
    assert "truncated" in start.inputs["big"]
    assert start.inputs["loop"] == ["[cycle]"]
    assert start.inputs["raw"] == "\\x80\\x81"
    handler.close()
