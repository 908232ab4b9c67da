"""ChatOpenAI (langchain-openai) over real HTTP against the scripted local server."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from bus import BusCallbackHandler, Settings
from bus import events as ev
from bus.demo.app import build_tool_chain, openai_model
from bus.demo.openai_server import DEFAULT_ANSWER
from tests.support.processes import free_port, spawn, stop, wait_http
from tests.support.published import by_trace, check_trace, read_all


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
