"""The fan-out handler against a real Redis: LangChain runs through the real
callback handler, partition streams handed over as the consumer would, and
history read back the way frontends read it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import fakeredis.aioredis
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.callbacks import dispatch_custom_event
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool

from bus.events import event_type
from bus.fanout.handler import FanoutHandler
from bus.history import Topic
from bus.producer.callbacks import BusCallbackHandler
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from tests.support.protocol import data_events, deliveries, history, text_of

TEXT = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox."


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def prepare(question: str, config: RunnableConfig) -> str:
    dispatch_custom_event("progress", {"step": "prepare"}, config=config)
    total = add.invoke({"a": 1, "b": 2}, config=config)
    return f"{question} {total}"


class ToolChunkModel(BaseChatModel):
    """A chat model that streams one text token, then a tool call in argument chunks."""

    @property
    def _llm_type(self) -> str:
        return "tool-chunks"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kw: Any) -> ChatResult:
        message = AIMessage(
            content="ok", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Any = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kw: Any,
    ) -> Iterator[ChatGenerationChunk]:
        pieces: list[tuple[str, list[Any]]] = [("ok", [])]
        for i, args in enumerate(['{"a": 1', ', "b"', ": 2}"]):
            name, call_id = ("add", "c1") if i == 0 else (None, None)
            pieces.append(("", [{"name": name, "args": args, "id": call_id, "index": 0}]))
        for text, chunks in pieces:
            chunk = ChatGenerationChunk(
                message=AIMessageChunk(content=text, tool_call_chunks=chunks)
            )
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


def _publish(sync_redis: redis.Redis, settings: Settings, run: Any) -> None:
    bus_handler = BusCallbackHandler(redis=sync_redis, settings=settings)
    try:
        run(bus_handler)
        bus_handler.publisher.flush()
    finally:
        bus_handler.close()
    assert bus_handler.failures == 0


def _trace_of(items: list[Delivery]) -> str:
    traces = {d.event.trace_id for d in items}
    assert len(traces) == 1
    return traces.pop()


async def _fan_out(
    async_redis: aioredis.Redis, settings: Settings, *, batch: int = 1000
) -> tuple[str, FanoutHandler]:
    items = await deliveries(async_redis, settings)
    handler = FanoutHandler(redis=async_redis, settings=settings)
    for start in range(0, len(items), batch):
        await handler(items[start : start + batch])
    return _trace_of(items), handler


def _chain_run(thread: str | None = None) -> Any:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=TEXT)]))
    chain = RunnableLambda(prepare, name="prepare") | model | StrOutputParser()
    config: RunnableConfig = {"metadata": {"thread_id": thread}} if thread else {}

    def run(bus_handler: BusCallbackHandler) -> None:
        output = "".join(chain.stream("q", config={**config, "callbacks": [bus_handler]}))
        assert output == TEXT

    return run


async def test_streaming_chain_reaches_trace_and_thread_history(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    _publish(sync_redis, settings, _chain_run(thread="thread-1"))
    trace, handler = await _fan_out(async_redis, settings, batch=7)
    events = await history(async_redis, settings, Topic("trace", trace))

    assert text_of(events) == TEXT
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["final"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["method"] == "lifecycle" and events[-1]["params"]["namespace"] == []
    assert data_events(events, "lifecycle") == ["started", "started", "completed", "completed"]
    prepare_ns = events[1]["params"]["namespace"]
    assert len(prepare_ns) == 1 and prepare_ns[0].startswith("prepare:")
    tools = [e for e in events if e["method"] == "tools"]
    assert [e["params"]["data"]["event"] for e in tools] == ["tool-started", "tool-finished"]
    assert tools[0]["params"]["data"]["input"] == {"a": 1, "b": 2}
    assert all(e["params"]["namespace"] == prepare_ns for e in tools)
    custom = [e["params"]["data"] for e in events if e["method"] == "custom"]
    assert custom == [{"name": "progress", "payload": {"step": "prepare"}}]
    messages = data_events(events, "messages")
    assert messages[:2] == ["message-start", "content-block-start"]
    assert messages[-2:] == ["content-block-finish", "message-finish"]

    thread = await history(async_redis, settings, Topic("thread", "thread-1"))
    assert [e["params"] for e in thread] == [e["params"] for e in events]
    assert not any(e["final"] for e in thread)  # a thread outlives its traces
    assert handler.stats.duplicates == 0


async def test_tool_call_chunks_become_a_tool_call_block(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    def run(bus_handler: BusCallbackHandler) -> None:
        list(ToolChunkModel().stream("q", config={"callbacks": [bus_handler]}))

    _publish(sync_redis, settings, run)
    trace, _ = await _fan_out(async_redis, settings)
    events = await history(async_redis, settings, Topic("trace", trace))
    datas = [e["params"]["data"] for e in events if e["method"] == "messages"]
    args = "".join(
        d["delta"]["args"] for d in datas if d["event"] == "content-block-delta" and d["index"] == 1
    )
    assert args == '{"a": 1, "b": 2}'
    finished = [d["content"] for d in datas if d["event"] == "content-block-finish"]
    assert finished == [
        {"type": "text", "text": "ok"},
        {"type": "tool_call", "id": "c1", "name": "add", "args": {"a": 1, "b": 2}},
    ]
    assert text_of(events) == "ok" and events[-1]["final"]


async def test_v3_stream_events_and_tokens_are_not_both_emitted(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    def run(bus_handler: BusCallbackHandler) -> None:
        model = GenericFakeChatModel(messages=iter([AIMessage(content=TEXT)]))
        for _ in model.stream_events("q", version="v3", config={"callbacks": [bus_handler]}):
            pass

    _publish(sync_redis, settings, run)
    items = await deliveries(async_redis, settings)
    assert {"on_llm_new_token", "on_stream_event"} <= {event_type(d.event) for d in items}
    trace, _ = await _fan_out(async_redis, settings)
    events = await history(async_redis, settings, Topic("trace", trace))
    assert text_of(events) == TEXT
    messages = data_events(events, "messages")
    assert messages.count("message-start") == 1 and messages.count("content-block-start") == 1
    assert messages.count("message-finish") == 1


async def _settled(async_redis: aioredis.Redis, settings: Settings, trace: str) -> list[Any]:
    events = await history(async_redis, settings, Topic("trace", trace))
    return [(e["method"], e["params"]["namespace"], e["params"]["data"]) for e in events]


async def test_redelivered_entries_do_not_duplicate_history(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    _publish(sync_redis, settings, _chain_run(thread="thread-2"))
    items = await deliveries(async_redis, settings)
    trace = _trace_of(items)
    handler = FanoutHandler(redis=async_redis, settings=settings.replace(fanout_coalesce_ms=0.0))
    half = len(items) // 2
    await handler(items[:half])
    await handler(items[:half])  # the same batch again (acknowledgement lost)
    await handler(items)  # pending re-read after a restart, split differently
    await handler(items[half - 3 :])
    once = await _settled(async_redis, settings, trace)
    assert handler.stats.duplicates == half + half + len(items[half - 3 :])

    # A fresh writer under another prefix, each entry delivered exactly once.
    other = settings.replace(prefix=settings.prefix + "-once", fanout_coalesce_ms=0.0)
    single = FanoutHandler(redis=async_redis, settings=other)
    await single(items)
    try:
        assert once == await _settled(async_redis, other, trace)
    finally:
        keys = [k async for k in async_redis.scan_iter(match=f"{other.prefix}:*")]
        if keys:
            await async_redis.delete(*keys)
    thread = await history(async_redis, settings, Topic("thread", "thread-2"))
    assert len(thread) == len(once)


async def test_a_stale_replica_is_refused_and_catches_up_without_duplicates(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    _publish(sync_redis, settings, _chain_run())
    items = await deliveries(async_redis, settings)
    trace = _trace_of(items)
    quiet = settings.replace(fanout_coalesce_ms=0.0)
    first, second = (
        FanoutHandler(redis=async_redis, settings=quiet),
        FanoutHandler(redis=async_redis, settings=quiet),
    )
    third = len(items) // 3
    await first(items[:third])
    # The lease moves: the second replica re-reads from the first entry not acknowledged.
    await second(items[: 2 * third])
    # The lease comes back; the first replica's cached state is now stale.
    await first(items[third:])
    assert first.stats.conflicts == 1
    events = await history(async_redis, settings, Topic("trace", trace))
    assert text_of(events) == TEXT
    assert [e["final"] for e in events].count(True) == 1 and events[-1]["final"]
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))


async def test_many_traces_in_one_batch_with_a_tiny_state_cache(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    settings = settings.replace(partitions=1, fanout_cache_traces=1)
    texts = [f"trace {n} says hello to everyone here" for n in range(3)]

    def run(bus_handler: BusCallbackHandler) -> None:
        for text in texts:
            model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
            list(model.stream("q", config={"callbacks": [bus_handler]}))

    _publish(sync_redis, settings, run)
    items = await deliveries(async_redis, settings)
    handler = FanoutHandler(redis=async_redis, settings=settings)
    for start in range(0, len(items), 5):
        await handler(items[start : start + 5])
    traces = list(dict.fromkeys(d.event.trace_id for d in items))
    for trace, text in zip(traces, texts, strict=True):
        events = await history(async_redis, settings, Topic("trace", trace))
        assert text_of(events) == text and events[-1]["final"]
    assert handler.stats.conflicts == 0 and handler.stats.duplicates == 0


async def test_a_lost_script_cache_is_reloaded_without_duplicates(settings: Settings) -> None:
    # A private fakeredis server: its script cache starts empty and can be flushed
    # without touching the shared Redis.
    server = fakeredis.FakeServer()
    sync_client = fakeredis.FakeRedis(server=server)
    async_client = fakeredis.aioredis.FakeRedis(server=server)
    _publish(sync_client, settings, _chain_run())
    items = await deliveries(async_client, settings)
    handler = FanoutHandler(redis=async_client, settings=settings)
    half = len(items) // 2
    await handler(items[:half])  # the first EVALSHA meets an empty cache
    await async_client.script_flush()
    await handler(items[half:])
    events = await history(async_client, settings, Topic("trace", _trace_of(items)))
    assert text_of(events) == TEXT and events[-1]["final"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert handler.stats.duplicates == 0
    await async_client.aclose()
    sync_client.close()


async def check_lost_thread_copy_is_caught_up_once(
    sync_client: redis.Redis, async_client: aioredis.Redis, settings: Settings
) -> None:
    """A replica dies after writing a trace and before copying it to its thread; the
    redelivered batch, all duplicates for the trace, still brings the thread up to date."""
    thread_id = "thread-lost-copy"
    _publish(sync_client, settings, _chain_run(thread=thread_id))
    items = await deliveries(async_client, settings)
    trace = _trace_of(items)
    quiet = settings.replace(fanout_coalesce_ms=0.0)
    dying = FanoutHandler(redis=async_client, settings=quiet)
    half = len(items) // 2
    await dying(items[:half])

    async def killed(*args: object) -> None:
        raise ConnectionError("worker killed between the trace write and the thread copy")

    dying._copy_to_threads = killed  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await dying(items[half:])
    trace_events = await history(async_client, settings, Topic("trace", trace))
    thread_topic = Topic("thread", thread_id)
    assert len(await history(async_client, settings, thread_topic)) < len(trace_events)

    successor = FanoutHandler(redis=async_client, settings=quiet)
    await successor(items[half:])  # redelivered after the lease moved
    await successor(items[half:])  # and once more: nothing to copy
    assert successor.stats.duplicates == 2 * (len(items) - half)
    thread_events = await history(async_client, settings, thread_topic)
    assert [e["params"] for e in thread_events] == [e["params"] for e in trace_events]
    assert [e["seq"] for e in thread_events] == list(range(1, len(trace_events) + 1))
    assert not any(e["final"] for e in thread_events)


async def test_lost_thread_copy_is_caught_up_once(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    await check_lost_thread_copy_is_caught_up_once(sync_redis, async_redis, settings)


def _resent(items: list[Delivery], start: int, stop: int, at: int) -> list[Delivery]:
    """Entries ``start:stop`` again under new entry ids (a batch the publisher re-sent)."""
    return [
        Delivery(entry_id=f"{at}-{n}", partition=d.partition, event=d.event)
        for n, d in enumerate(items[start:stop])
    ]


async def test_a_resent_batch_under_new_entry_ids_is_applied_once_across_replicas(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    _publish(sync_redis, settings, _chain_run())
    items = await deliveries(async_redis, settings)
    trace = _trace_of(items)
    quiet = settings.replace(fanout_coalesce_ms=0.0)
    first, second = (
        FanoutHandler(redis=async_redis, settings=quiet),
        FanoutHandler(redis=async_redis, settings=quiet),
    )
    third = len(items) // 3
    late = int(items[-1].entry_id.split("-")[0]) + 1
    # The stream as a timed-out send leaves it: a batch, the same batch again, then on.
    await first([*items[:third], *_resent(items, 0, third, late)])
    # The lease moves: the other replica reads the next copy of a re-sent batch.
    await second([*_resent(items, third - 5, 2 * third, late + 1), *items[2 * third :]])
    await first(_resent(items, 2 * third, len(items), late + 2))
    events = await history(async_redis, settings, Topic("trace", trace))
    assert text_of(events) == TEXT
    assert [e["final"] for e in events].count(True) == 1 and events[-1]["final"]
    assert first.stats.duplicates == third + len(items) - 2 * third
    assert second.stats.duplicates == 5


async def test_a_trace_joined_twice_from_one_process_keeps_both_runs(
    sync_redis: redis.Redis, async_redis: aioredis.Redis, settings: Settings
) -> None:
    """Two runs of one process join a trace rooted elsewhere, one after the other:
    the second one's events are new events, not copies of the first one's."""
    texts = ["first child run says hi", "second child run says bye"]

    def run(bus_handler: BusCallbackHandler) -> None:
        for text in texts:
            model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
            config: RunnableConfig = {
                "callbacks": [bus_handler],
                "metadata": {"lcbus_trace_id": "remote-root"},
            }
            list(model.stream("q", config=config))

    _publish(sync_redis, settings, run)
    items = await deliveries(async_redis, settings)
    assert _trace_of(items) == "remote-root"
    handler = FanoutHandler(redis=async_redis, settings=settings)
    await handler(items)
    events = await history(async_redis, settings, Topic("trace", "remote-root"))
    assert text_of(events) == "".join(texts)
    assert handler.stats.duplicates == 0
