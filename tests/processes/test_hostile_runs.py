"""Hostile content in real LangChain runs, through every consumer: lone surrogates
never keep a trace from ending, and planted secrets appear in no key of the prefix.

The app side is the real callback handler; the fan-out, trace and webhook
handlers run in this process against the real Redis (webhook attempts through
arq's worker, to a receiver process); SSE clients read a frontend process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.callbacks import dispatch_custom_event
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool

from bus.fanout.handler import FanoutHandler
from bus.producer.callbacks import BusCallbackHandler
from bus.runtime.arqpool import arq_pool
from bus.settings import Settings
from bus.tokens import stream_token
from bus.traces.aggregator import TraceAggregator
from bus.traces.queries import get_trace
from bus.webhooks.endpoints import Endpoints
from bus.webhooks.router import Router
from tests.support.frontend import SECRET, Received, collect, frontend
from tests.support.protocol import deliveries
from tests.support.webhooks import Receiver, run_jobs, start_receiver, webhook_settings

CHUNKS = ["Hi ", "\ud83d", "\ude00", " there"]
"""An emoji split across two chunks: each half alone is a lone surrogate."""


class SplitEmojiModel(BaseChatModel):
    """Streams :data:`CHUNKS`, the way a provider that splits code units does."""

    @property
    def _llm_type(self) -> str:
        return "split-emoji"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, **kw: Any) -> ChatResult:
        message = AIMessage(content="".join(CHUNKS))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Any = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kw: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for text in CHUNKS:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    yield from start_receiver()


async def _through_every_consumer(settings: Settings, client: aioredis.Redis) -> None:
    items = await deliveries(client, settings)
    await FanoutHandler(redis=client, settings=settings)(items)
    await TraceAggregator(redis=client, settings=settings)(items)
    arq = arq_pool(settings)
    try:
        await Router(redis=client, arq=arq, settings=settings)(items)
    finally:
        await arq.aclose()
    await run_jobs(settings, client)


async def _sse(settings: Settings, trace: str) -> Received:
    with frontend(settings.redis_url, settings.prefix) as web:
        url = f"{web.url}/traces/{trace}/stream?token={stream_token(trace, secret=SECRET)}"
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
            return await collect(http, "GET", url)


async def test_a_lone_surrogate_never_keeps_a_trace_from_ending(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis, receiver: Receiver
) -> None:
    settings = webhook_settings(settings, webhook_registry_cache_ms=0)
    await Endpoints(redis=async_redis, settings=settings).add(
        receiver.url("surrogates"), events=["llm.end", "chain.end"]
    )
    handler = BusCallbackHandler(redis=sync_redis, settings=settings)
    run_id = uuid.uuid4()
    chain = RunnableLambda(lambda q: q, name="prepare") | SplitEmojiModel() | StrOutputParser()
    config: RunnableConfig = {"callbacks": [handler], "run_id": run_id}
    try:
        assert "".join(chain.stream("q", config=config)) == "".join(CHUNKS)
        assert handler.publisher.flush(5)
    finally:
        handler.close()
    assert handler.failures == 0
    await _through_every_consumer(settings, async_redis)
    trace = str(run_id)
    stored = await get_trace(async_redis, settings, trace)
    assert stored is not None and stored.status == "success" and stored.completed
    sse = await _sse(settings, trace)
    assert sse.error is None and sse.ended
    # Each lone half became U+FFFD; the whole text, where both halves meet, the emoji.
    assert sse.text() == "Hi \ufffd\ufffd there"
    ends = [r for r in receiver.received("surrogates") if b'"llm.end"' in r["body"].encode()]
    assert len(ends) == 1 and "Hi 😀 there" in ends[0]["body"]
    assert len(receiver.received("surrogates")) == 1 + 3  # the model's end, three chains'


PLANTED = {
    "openai": "sk-plantedOpenAIkey0123456789",
    "github": "ghp_plantedGitHubToken0123456789abcd",
    "header": "planted-bearer-credential-42",
    "error": "planted-error-password-77",
    "custom": "planted-custom-secret-99",
    "metadata": "planted-metadata-token-11",
}


@tool
def lookup(query: str, api_key: str, github_token: str) -> str:
    """Look something up in a service that needs credentials."""
    return f"found {query}"


@tool
def fragile(query: str) -> str:
    """A tool whose failure quotes a credential."""
    raise ValueError(f"upstream refused the request: password={PLANTED['error']}")


def _agentish(question: str, config: RunnableConfig) -> str:
    headers = [("Authorization", f"Bearer {PLANTED['header']}"), ("Accept", "json")]
    dispatch_custom_event(
        "call", {"headers": headers, "password": PLANTED["custom"]}, config=config
    )
    arguments = {"query": question, "api_key": PLANTED["openai"], "github_token": PLANTED["github"]}
    answer = lookup.invoke(arguments, config=config)
    with contextlib.suppress(ValueError):
        fragile.invoke({"query": question}, config=config)
    return answer


async def test_planted_secrets_reach_no_key_under_the_prefix(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis, receiver: Receiver
) -> None:
    settings = webhook_settings(settings, webhook_registry_cache_ms=0)
    await Endpoints(redis=async_redis, settings=settings).add(receiver.url("secrets"), events=["*"])
    handler = BusCallbackHandler(redis=sync_redis, settings=settings)
    metadata = {"github_token": PLANTED["metadata"], "openai_key": PLANTED["metadata"], "ok": 1}
    config: RunnableConfig = {"callbacks": [handler], "metadata": metadata}
    try:
        assert RunnableLambda(_agentish, name="agent").invoke("q", config=config) == "found q"
        assert handler.publisher.flush(5)
    finally:
        handler.close()
    assert handler.failures == 0
    await _through_every_consumer(settings, async_redis)
    everything = await _every_value(sync_redis, settings)
    assert len(everything) > 20  # streams, history, trees, webhook messages, attempt logs...
    for name, secret in PLANTED.items():
        leaks = [key for key, blob in everything.items() if secret.encode() in blob]
        assert leaks == [], f"the {name} secret is in {leaks}"
    bodies = [r["body"] for r in receiver.received("secrets")]
    types = sorted(json.loads(b)["type"] for b in bodies)
    expected = ["chain.start", "custom.call", "tool.start", "tool.end", "tool.start"]
    assert types == sorted([*expected, "tool.error", "chain.end"])
    assert not [b for b in bodies for s in PLANTED.values() if s in b]
    # What the redaction left is still useful: the query and the tool's error type.
    assert any('"query": "q"' in b or "'query': 'q'" in b for b in bodies)


async def _every_value(client: redis.Redis, settings: Settings) -> dict[str, bytes]:
    """Every key under the prefix with all its content as one byte string."""
    found: dict[str, bytes] = {}
    for raw in client.scan_iter(match=f"{settings.prefix}:*", count=1000):
        key = raw.decode()
        kind = client.type(raw).decode()
        if kind == "string":
            found[key] = client.get(raw) or b""
        elif kind == "hash":
            found[key] = b"\n".join(k + b"=" + v for k, v in client.hgetall(raw).items())
        elif kind == "stream":
            entries: Any = client.xrange(raw)
            found[key] = b"\n".join(v for _, fields in entries for v in fields.values())
        elif kind == "zset":
            found[key] = b"\n".join(client.zrange(raw, 0, -1))
        elif kind == "set":
            found[key] = b"\n".join(client.smembers(raw))
        elif kind == "list":
            found[key] = b"\n".join(client.lrange(raw, 0, -1))
    await asyncio.sleep(0)
    return found
