"""Two fan-out worker processes (started from arq's command line), one killed
with SIGKILL while a trace streams: history stays complete, ordered and free
of duplicates, identical to what a single uninterrupted writer produces, and
SSE clients watching through a frontend process see exactly that stream."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk

from bus.fanout.handler import FanoutHandler
from bus.history import Topic
from bus.keys import Keys, partition_of
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.tokens import stream_token
from tests.support.frontend import SECRET, Received, collect, frontend
from tests.support.processes import start_worker, stop
from tests.support.protocol import deliveries, history, text_of
from tests.support.waiting import wait_until, wait_until_async

FANOUT = "workers.fanout.WorkerSettings"
TRACES = 3
WORDS = 150


class SlowModel(GenericFakeChatModel):
    """Streams like GenericFakeChatModel, a few milliseconds per token (a live trace)."""

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(messages, stop, run_manager, **kwargs):
            time.sleep(0.004)
            yield chunk


def _text(n: int) -> str:
    return " ".join(f"w{n}-{i}" for i in range(WORDS))


def _app(settings: Settings, run_ids: list[uuid.UUID], failures: list[BaseException]) -> None:
    handler = BusCallbackHandler(settings=settings)
    try:
        for n, run_id in enumerate(run_ids):
            model = SlowModel(messages=iter([AIMessage(content=_text(n))]))
            config: Any = {"callbacks": [handler], "run_id": run_id}
            assert "".join(str(c.content) for c in model.stream("q", config=config)) == _text(n)
        handler.publisher.flush()
    except BaseException as exc:
        failures.append(exc)
    finally:
        handler.close()


def _owner_pid(client: redis.Redis, settings: Settings, partition: int) -> int | None:
    value = client.get(Keys(settings.prefix, settings.partitions).lease("fanout", partition))
    return None if value is None else int(value.decode().split(":")[-2])


def _finished(client: redis.Redis, settings: Settings, trace: str) -> bool:
    last: Any = client.xrevrange(Keys(settings.prefix, settings.partitions).history(trace), count=1)
    return bool(last) and last[0][1].get(b"f") == b"1"


async def _histories(settings: Settings, traces: list[str]) -> list[list[dict[str, Any]]]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return [await history(client, settings, Topic("trace", t)) for t in traces]
    finally:
        await client.aclose()


async def _reference(settings: Settings, traces: list[str]) -> list[list[dict[str, Any]]]:
    """The same entries through one in-process writer, once each, under another prefix."""
    client = aioredis.Redis.from_url(settings.redis_url)
    other = settings.replace(prefix=settings.prefix + "-ref")
    try:
        await FanoutHandler(redis=client, settings=other)(await deliveries(client, settings))
        return [await history(client, other, Topic("trace", t)) for t in traces]
    finally:
        keys = [k async for k in client.scan_iter(match=f"{other.prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def test_sigkill_a_fanout_replica_mid_trace(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    settings = settings.replace(
        partitions=2, lease_ttl_ms=1500, read_count=8, read_block_ms=300, fanout_coalesce_ms=0.0
    )
    env = {"LCBUS_FANOUT_COALESCE_MS": "0"}
    a = start_worker(settings, tmp_path / "a.log", target=FANOUT, **env)
    b = start_worker(settings, tmp_path / "b.log", target=FANOUT, **env)
    run_ids = [uuid.uuid4() for _ in range(TRACES)]
    traces = [str(r) for r in run_ids]
    failures: list[BaseException] = []
    app = threading.Thread(target=_app, args=(settings, run_ids, failures))
    try:
        pids = {a.pid, b.pid}
        wait_until(
            lambda: {_owner_pid(sync_redis, settings, p) for p in range(2)} == pids,
            what="both replicas owning a partition",
        )
        app.start()
        first = Keys(settings.prefix, settings.partitions).history(traces[0])
        wait_until(lambda: sync_redis.xlen(first) >= 40, what="the first trace streaming")
        victim = _owner_pid(sync_redis, settings, partition_of(traces[0], 2))
        killed = a if victim == a.pid else b
        stop(killed, signal.SIGKILL)
        assert not _finished(sync_redis, settings, traces[0]), "killed after the trace ended"
        survivor = b if killed is a else a
        wait_until(
            lambda: all(_finished(sync_redis, settings, t) for t in traces),
            within=60,
            what="every trace's final event",
        )
        app.join(timeout=30)
        assert survivor.poll() is None
    finally:
        stop(a, signal.SIGTERM)
        stop(b, signal.SIGTERM)
        app.join(timeout=30)
    assert not failures
    got = asyncio.run(_histories(settings, traces))
    want = asyncio.run(_reference(settings, traces))
    for n, events in enumerate(got):
        assert text_of(events) == _text(n)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["final"] for e in events].count(True) == 1 and events[-1]["final"]
        assert [(e["method"], e["params"]) for e in events] == [
            (e["method"], e["params"]) for e in want[n]
        ]


async def test_sse_clients_see_a_whole_stream_across_a_sigkilled_replica(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    settings = settings.replace(partitions=2, lease_ttl_ms=1500, read_count=8, read_block_ms=300)
    a = start_worker(settings, tmp_path / "a.log", target=FANOUT)
    b = start_worker(settings, tmp_path / "b.log", target=FANOUT)
    run_ids = [uuid.uuid4() for _ in range(TRACES)]
    traces = [str(r) for r in run_ids]
    failures: list[BaseException] = []
    app = threading.Thread(target=_app, args=(settings, run_ids, failures))
    try:
        with frontend(settings.redis_url, settings.prefix) as server:
            pids = {a.pid, b.pid}
            await wait_until_async(
                lambda: {_owner_pid(sync_redis, settings, p) for p in range(2)} == pids,
                what="both replicas owning a partition",
            )
            async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http:
                started = [asyncio.Event() for _ in range(2 * TRACES)]
                clients = [
                    asyncio.create_task(collect(http, "GET", url, started=started[i]))
                    for i, url in enumerate(
                        f"{server.url}/traces/{t}/stream?token={stream_token(t, secret=SECRET)}"
                        for t in traces
                        for _ in range(2)
                    )
                ]
                await asyncio.gather(*(event.wait() for event in started))
                app.start()
                first = Keys(settings.prefix, settings.partitions).history(traces[0])
                await wait_until_async(
                    lambda: sync_redis.xlen(first) >= 20, what="the first trace streaming"
                )
                victim = _owner_pid(sync_redis, settings, partition_of(traces[0], 2))
                stop(a if victim == a.pid else b, signal.SIGKILL)
                assert not _finished(sync_redis, settings, traces[0]), "killed after the end"
                received = await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
    finally:
        stop(a, signal.SIGTERM)
        stop(b, signal.SIGTERM)
        if app.ident is not None:  # started
            app.join(timeout=30)
    assert not failures
    for n, got in enumerate(received):
        _assert_whole(got, _text(n // 2))


def _assert_whole(got: Received, text: str) -> None:
    assert got.error is None and got.ended
    assert got.seqs == list(range(1, len(got.seqs) + 1))  # ordered, no gap, no duplicate
    assert len(set(got.ids)) == len(got.ids)
    assert [e["event_id"] for e in got.envelopes] == got.ids
    assert got.text() == text
    assert got.envelopes[-1]["method"] == "lifecycle"
    assert got.envelopes[-1]["params"]["data"]["event"] == "completed"
