"""ChatOpenAI (langchain-openai) over real HTTP against the scripted local server."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from bus import BusCallbackHandler, Settings
from bus import events as ev
from bus.demo.app import build_tool_chain, openai_model
from bus.demo.openai_server import DEFAULT_ANSWER
from bus.demo.ports import free_port
from bus.traces.aggregator import TraceAggregator
from bus.webhooks.outbox import build_body
from tests.support.frontend import frontend
from tests.support.processes import spawn, stop, wait_http
from tests.support.published import bus_deliveries, by_trace, check_trace, read_all


@pytest.fixture(scope="module")
def openai_url() -> Iterator[str]:
    port = free_port()
    server = spawn(["-m", "bus.demo.openai_server", "--port", str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(server, signal.SIGTERM)


def test_server_refuses_malformed_requests(openai_url: str) -> None:
    assert httpx.post(f"{openai_url}/chat/completions", content=b"{nope").status_code == 400
    assert httpx.post(f"{openai_url}/chat/completions", json={"messages": 3}).status_code == 400


def test_chat_openai_streams_a_tool_call_then_the_answer(
    openai_url: str, settings: Settings, sync_redis: redis.Redis
) -> None:
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    answer = build_tool_chain(openai_model(openai_url)).invoke(
        "How do redis and langchain fit?", config={"callbacks": [handler], "run_id": root}
    )
    assert answer == DEFAULT_ANSWER
    assert handler.publisher.flush(5)
    events = by_trace(read_all(sync_redis, settings))[str(root)]
    check_trace(events, str(root))
    model_ends = [e for e in events if isinstance(e, ev.LLMEnd)]
    assert len(model_ends) == 2  # the tool call, then the answer
    assert model_ends[1].text == DEFAULT_ANSWER
    assert all(e.usage and e.usage["total_tokens"] > 0 for e in model_ends)
    tool_chunks = [c for e in events if isinstance(e, ev.LLMNewToken) for c in e.tool_call_chunks]
    assert tool_chunks and tool_chunks[0]["name"] == "word_count"
    tool_end = next(e for e in events if isinstance(e, ev.ToolEnd))
    assert tool_end.name == "word_count"
    answer_run = model_ends[1].run_id
    text = "".join(
        e.token for e in events if isinstance(e, ev.LLMNewToken) and e.run_id == answer_run
    )
    assert text == DEFAULT_ANSWER
    handler.close()


@pytest.mark.parametrize("stream_usage", [False, True], ids=["usage-off", "stream-usage"])
def test_usage_the_provider_did_not_report_is_unknown_not_zero(
    stream_usage: bool, openai_url: str, settings: Settings, sync_redis: redis.Redis
) -> None:
    """``ChatOpenAI`` with a custom ``base_url`` streams no usage unless ``stream_usage=True``:
    the tree, the trace API and the ``trace.completed`` webhook then say null, never 0."""
    model = ChatOpenAI(
        model="gpt-4o-mini",
        base_url=openai_url,
        api_key="local",  # type: ignore[arg-type]
        streaming=True,
        max_retries=0,
        **({"stream_usage": True} if stream_usage else {}),
    )
    handler = BusCallbackHandler(settings=settings)
    root = uuid.uuid4()
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    assert chain.invoke({"q": "hi"}, config={"callbacks": [handler], "run_id": root}) == (
        DEFAULT_ANSWER
    )
    assert handler.publisher.flush(5)
    handler.close()
    asyncio.run(_aggregate(settings, sync_redis))

    # The prompt "hi" is 1 token and the answer 23 words, as the scripted server counts.
    reported = {"input_tokens": 1, "output_tokens": 23, "total_tokens": 24}
    usage = reported if stream_usage else None
    env = {"LCBUS_OPEN_ACCESS": "true", "LCBUS_PARTITIONS": str(settings.partitions)}
    with frontend(settings.redis_url, settings.prefix, **env) as server:
        answer = httpx.get(f"{server.url}/traces/{root}", timeout=10)
    assert answer.status_code == 200, answer.text
    tree = answer.json()
    [llm] = [run for run in tree["root"]["children"] if run["run_type"] == "llm"]
    assert (llm["name"], llm["model_type"], llm["usage"]) == ("ChatOpenAI", "chat", usage)
    assert (tree["usage"], tree["unreported_usage"]) == (usage, 0 if stream_usage else 1)
    [done] = [e for e in read_all(sync_redis, settings) if isinstance(e, ev.TraceCompleted)]
    webhook = json.loads(build_body(done, "trace.completed"))
    assert webhook["data"]["rollup"]["usage"] == usage
    assert webhook["data"]["rollup"]["unreported_usage"] == (0 if stream_usage else 1)


async def _aggregate(settings: Settings, sync_redis: redis.Redis) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        await TraceAggregator(redis=client, settings=settings)(bus_deliveries(sync_redis, settings))
    finally:
        await client.aclose()
