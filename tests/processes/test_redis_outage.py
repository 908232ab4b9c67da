"""Redis stalled past the publisher's socket timeout, then SIGKILLed and restarted,
while a trace streams: the publisher re-sends batches Redis had already applied
(the same events land twice, under new entry ids), yet history, SSE clients and
webhook receivers get every event exactly once.

The server is owned by the test (AOF with fsync on every write, so what Redis
acknowledged survives the SIGKILL); the fan-out and webhook workers run from
their arq command lines; the app publishes with a short socket timeout."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk
from standardwebhooks.webhooks import Webhook

from bus import events as ev
from bus.history import Topic
from bus.keys import ENTRY_FIELD, Keys
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.tokens import stream_token
from bus.webhooks.endpoints import Endpoint, Endpoints
from tests.support.frontend import SECRET, Received, collect, frontend
from tests.support.processes import start_worker, stop
from tests.support.protocol import history, text_of
from tests.support.redis_server import OwnedRedis
from tests.support.waiting import wait_until
from tests.support.webhooks import LOOPBACK, Receiver, start_receiver

WORDS = 150
TEXT = " ".join(f"w{i}" for i in range(WORDS))
PUBLISH_TIMEOUT_S = 0.2
WEBHOOK_TYPES = {"on_llm_new_token", "on_llm_end"}
ENV = {
    "LCBUS_FANOUT_COALESCE_MS": "0",
    "LCBUS_WEBHOOK_ALLOW_NETWORKS": LOOPBACK,
    "LCBUS_WEBHOOK_SCHEDULE": "0,0.5,0.5,0.5,1,1,2,2,2",
    "LCBUS_WEBHOOK_JITTER": "0",
    "LCBUS_WEBHOOK_REGISTRY_CACHE_MS": "100",
}


class SlowModel(GenericFakeChatModel):
    """A few milliseconds per token: the outage falls in the middle of the stream."""

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(messages, stop, run_manager, **kwargs):
            time.sleep(0.01)
            yield chunk


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from start_receiver()


def _app(settings: Settings, port: int, run_id: uuid.UUID, failures: list[BaseException]) -> None:
    client = redis.Redis(
        port=port, socket_timeout=PUBLISH_TIMEOUT_S, socket_connect_timeout=PUBLISH_TIMEOUT_S
    )
    handler = BusCallbackHandler(settings=settings, redis=client)
    try:
        model = SlowModel(messages=iter([AIMessage(content=TEXT)]))
        config: Any = {"callbacks": [handler], "run_id": run_id}
        assert "".join(str(c.content) for c in model.stream("q", config=config)) == TEXT
        assert handler.publisher.flush(timeout=30)
        assert handler.publisher.stats.dropped == 0
    except BaseException as exc:
        failures.append(exc)
    finally:
        handler.close()
        client.close()


def _finished(client: redis.Redis, settings: Settings, trace: str) -> bool:
    try:
        last: Any = client.xrevrange(
            Keys(settings.prefix, settings.partitions).history(trace), count=1
        )
    except redis.RedisError:
        return False
    return bool(last) and last[0][1].get(b"f") == b"1"


def _stream_entries(client: redis.Redis, settings: Settings) -> int:
    keys = Keys(settings.prefix, settings.partitions)
    return sum(int(client.xlen(keys.events(p))) for p in range(settings.partitions))


class Supervisor:
    """Starts a worker and starts it again if it exits, as compose's ``restart:`` does.

    arq's poll loop can end on a connection that breaks between its WATCH and its
    EXEC (Redis killed at that moment); the worker then exits for its supervisor.
    """

    def __init__(self, settings: Settings, log: Path, target: str, env: dict[str, str]) -> None:
        self.args = (settings, log, target, env)
        self.restarts = 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        settings, log, target, env = self.args
        return start_worker(settings, log, target=target, **env)

    def check(self) -> None:
        if self.process.poll() is not None:
            self.restarts += 1
            self.process = self._start()

    def stop(self) -> None:
        stop(self.process, signal.SIGTERM)


def _outage(server: OwnedRedis, client: redis.Redis, settings: Settings) -> None:
    """Stall Redis past the publisher's socket timeout, then SIGKILL and restart it."""
    wait_until(lambda: _stream_entries(client, settings) >= 30, what="the trace streaming")
    server.pause()
    time.sleep(1.5)
    server.resume()
    wait_until(lambda: _stream_entries(client, settings) >= 80, what="the stream resuming")
    server.restart(down_s=0.3)


@pytest.fixture
def server() -> Iterator[OwnedRedis]:
    with OwnedRedis(aof=True) as owned:
        owned.start()
        yield owned


def test_redis_stalled_then_killed_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path, receiver: Receiver, server: OwnedRedis
) -> None:
    port = server.port
    settings = Settings(
        redis_url=server.url,
        prefix="lcbus-outage",
        partitions=2,
        lease_ttl_ms=1500,
        read_block_ms=300,
        fanout_coalesce_ms=0.0,
        webhook_allow_networks=LOOPBACK,
    )
    client = redis.Redis(port=port, socket_timeout=5)
    endpoint = asyncio.run(_endpoint(settings, receiver.url("outage")))
    fanout = Supervisor(settings, tmp_path / "fanout.log", "workers.fanout.WorkerSettings", ENV)
    hooks = Supervisor(settings, tmp_path / "hooks.log", "workers.webhooks.WorkerSettings", ENV)
    run_id = uuid.uuid4()
    trace = str(run_id)
    failures: list[BaseException] = []
    app = threading.Thread(target=_app, args=(settings, port, run_id, failures))
    try:
        lease = Keys(settings.prefix, settings.partitions).lease("fanout", 0)
        wait_until(lambda: client.exists(lease) > 0, what="the fan-out worker up")
        app.start()
        _outage(server, client, settings)
        app.join(timeout=60)

        def done(check: Any) -> bool:
            fanout.check()
            hooks.check()
            return bool(check())

        wait_until(lambda: done(lambda: _finished(client, settings, trace)), what="the trace's end")
        sse = asyncio.run(_sse(settings, trace))
        entries, events = _published(client, settings)
        expected = {"msg_" + e.id for e in events if ev.event_type(e) in WEBHOOK_TYPES}
        wait_until(lambda: done(lambda: _webhook_ids(receiver) >= expected), what="every webhook")
        time.sleep(1.0)  # a late duplicate would arrive meanwhile
        stored = asyncio.run(_history(settings, trace))
    finally:
        fanout.stop()
        hooks.stop()
        if app.ident is not None:
            app.join(timeout=30)
        client.close()
    assert not failures
    # The outage made the publisher send events twice ...
    assert entries > len(events)
    # ... and nobody saw one twice, nor missed one.
    assert text_of(stored) == TEXT
    assert [e["final"] for e in stored].count(True) == 1 and stored[-1]["final"]
    assert sse.error is None and sse.ended and sse.text() == TEXT
    assert sse.seqs == list(range(1, len(sse.seqs) + 1))
    assert [e["event_id"] for e in stored] == sse.ids
    requests = receiver.received("outage")
    # Webhooks are at-least-once: an attempt whose POST went out while Redis could
    # not record it is made again, under the same webhook-id (receivers drop it).
    assert {r["headers"]["webhook-id"] for r in requests} == expected
    for request in requests:
        Webhook(endpoint.active_secrets(0)[0]).verify(request["body"], request["headers"])


async def _endpoint(settings: Settings, url: str) -> Endpoint:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await Endpoints(redis=client, settings=settings).add(
            url, events=["llm.new_token", "llm.end"]
        )
    finally:
        await client.aclose()


async def _sse(settings: Settings, trace: str) -> Received:
    with frontend(settings.redis_url, settings.prefix) as web:
        url = f"{web.url}/traces/{trace}/stream?token={stream_token(trace, secret=SECRET)}"
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
            return await collect(http, "GET", url)


def _published(client: redis.Redis, settings: Settings) -> tuple[int, list[ev.Event]]:
    """How many entries the partition streams hold, and the distinct events among them."""
    keys = Keys(settings.prefix, settings.partitions)
    entries = 0
    events: dict[str, ev.Event] = {}
    for p in range(settings.partitions):
        for _, fields in client.xrange(keys.events(p)):
            entries += 1
            event = ev.decode(fields[ENTRY_FIELD])
            events.setdefault(event.id, event)
    return entries, list(events.values())


def _webhook_ids(receiver: Receiver) -> set[str]:
    return {r["headers"]["webhook-id"] for r in receiver.received("outage")}


async def _history(settings: Settings, trace: str) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await history(client, settings, Topic("trace", trace))
    finally:
        await client.aclose()
