"""A master SIGKILLed mid-stream and restarted (no replicas), with the whole bus running
as real processes: an app publishing through the callback handler, the fan-out,
trace and webhook workers from their arq command lines, a frontend and SSE clients
that resume as a browser's EventSource does.

The traces are chosen so that their partitions and their histories lie on every
master, the killed one included. While it is down, the traces that live wholly
on the other masters keep reaching their clients; once it is back, every client
has its whole text once, every tree is complete, every webhook arrives signed,
and whatever the publisher could not write meanwhile was buffered, not dropped.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from langchain_core.callbacks.manager import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk

from bus.keys import Keys, key_slot, partition_of
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from tests.cluster.test_cluster_processes import (
    HOOK,
    WORKERS,
    Deployment,
    _delete,
    _register,
    _trees_complete,
    _url,
    _wait_members,
    _webhooks_verify,
)
from tests.conftest import REDIS_URL, require_redis
from tests.processes.test_fanout_processes import _assert_whole
from tests.support.frontend import SECRET, Received, collect, frontend
from tests.support.processes import start_worker, stop
from tests.support.redis_cluster import OwnedCluster
from tests.support.waiting import wait_until_async
from tests.support.webhooks import LOOPBACK, start_receiver

WORDS = 80
HOLD_AT = WORDS // 2
"""Every trace streams this many words, then waits until the master is down."""
DOWN_S = 3.0
"""How long the master stays down once the live traces have been seen to flow."""


class GatedModel(GenericFakeChatModel):
    """Streams its reply word by word, pausing at word ``HOLD_AT`` until ``gate`` is set."""

    gate: Any = None

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for index, chunk in enumerate(super()._stream(messages, stop, run_manager, **kwargs)):
            if index == 2 * HOLD_AT:  # words and the spaces between them are chunks
                self.gate.wait()
            time.sleep(0.01)
            yield chunk


@dataclass(frozen=True)
class Trace:
    run_id: uuid.UUID
    partition_port: int
    """The master of the trace's partition (its events, lease and tree)."""
    history_port: int
    """The master of the trace's history and live channel."""

    @property
    def id(self) -> str:
        return str(self.run_id)

    def text(self) -> str:
        return " ".join(f"{self.id[:8]}-{i}" for i in range(WORDS))


def _pick_traces(cluster: OwnedCluster, settings: Settings, victim: int) -> list[Trace]:
    """One trace per (partition master, history master) pair below: every master
    carries partitions, and histories lie on the victim and elsewhere."""
    live = [p for p in cluster.ports if p != victim]
    wanted = [(live[0], live[0]), (live[1], live[1]), (victim, victim), (victim, live[0])]
    wanted.append((live[1], victim))
    keys = Keys(settings.prefix, settings.partitions)
    owners = {p: cluster.owner_port(key_slot(keys.events(p))) for p in range(settings.partitions)}
    found: dict[tuple[int, int], Trace] = {}
    while len(found) < len(wanted):
        run_id = uuid.uuid4()
        trace = str(run_id)
        pair = (
            owners[partition_of(trace, settings.partitions)],
            cluster.owner_port(key_slot(keys.history(trace))),
        )
        if pair in wanted and pair not in found:
            found[pair] = Trace(run_id, *pair)
    return [found[pair] for pair in wanted]


@pytest.fixture
def deployment(cluster: OwnedCluster, tmp_path: Any) -> Iterator[Deployment]:
    """One replica of each worker and one frontend on the session's cluster."""
    require_redis()  # the queue Redis
    settings = Settings(
        redis_url=cluster.url,
        queue_redis_url=REDIS_URL,
        prefix=f"lcbus-ctest-{uuid.uuid4().hex[:12]}",
        partitions=8,
        lease_ttl_ms=1500,
        read_block_ms=300,
        stream_secret=SECRET,
        webhook_allow_networks=LOOPBACK,
        webhook_schedule="0,1,2,5",
        trace_complete_timeout_s=30.0,
    )
    receiver_cm = start_receiver()
    receiver = next(receiver_cm)
    secret = asyncio.run(_register(settings, receiver.url(HOOK)))
    workers = {
        name: [
            start_worker(
                settings, tmp_path / f"{name}.log", target=f"workers.{name}.WorkerSettings"
            )
        ]
        for name in WORKERS
    }
    env = {
        "LCBUS_PARTITIONS": "8",
        "LCBUS_QUEUE_REDIS_URL": REDIS_URL,
        "LCBUS_PING_INTERVAL_S": "1",
    }
    try:
        with frontend(cluster.url, settings.prefix, **env) as server:
            _wait_members(settings, replicas=1)
            yield Deployment(settings, [server], receiver, secret, workers)
    finally:
        for replicas in workers.values():
            for process in replicas:
                try:
                    stop(process, signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    stop(process, signal.SIGKILL)
        with pytest.raises(StopIteration):
            next(receiver_cm)
        _delete(cluster, settings.prefix)


def _app(
    settings: Settings, traces: list[Trace], gate: threading.Event, out: dict[str, Any]
) -> None:
    """The traces streamed at once, one thread each, through one callback handler."""
    handler = BusCallbackHandler(settings=settings)
    out["publisher"] = handler.publisher

    def run(trace: Trace) -> None:
        model = GatedModel(messages=iter([AIMessage(content=trace.text())]), gate=gate)
        config: Any = {"callbacks": [handler], "run_id": trace.run_id}
        assert "".join(str(c.content) for c in model.stream("q", config=config)) == trace.text()

    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in traces]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out["flushed"] = handler.publisher.flush(timeout=60)
        out["stats"] = handler.publisher.stats
    except BaseException as exc:
        out["failure"] = exc
    finally:
        handler.close()


async def _follow(http: httpx.AsyncClient, url: str, got: Received, resumed: list[int]) -> None:
    """Read the stream to its end as an EventSource does: on a retryable error,
    reconnect after the ``retry:`` hint with ``Last-Event-ID``."""
    while True:
        headers = {"Last-Event-ID": got.ids[-1]} if got.ids else {}
        await collect(http, "GET", url, into=got, headers=headers)
        if got.ended or got.error is None or not got.error.get("retryable"):
            return
        got.error = None
        resumed[0] += 1
        await asyncio.sleep((got.retry or 1000) / 1000)


def _progress(
    settings: Settings, traces: list[Trace], received: list[Received], victim: int
) -> str:
    """Where each trace got to: at the client, in its history, in its partition's groups."""
    keys = Keys(settings.prefix, settings.partitions)
    lines = []
    for trace, got in zip(traces, received, strict=True):
        partition = partition_of(trace.id, settings.partitions)
        stages: dict[str, Any] = {"client words": _words(got), "client error": got.error}
        stages["history"] = _ask(trace.history_port, victim, "XLEN", keys.history(trace.id))
        stages["groups"] = _ask(
            trace.partition_port, victim, "XINFO", "GROUPS", keys.events(partition)
        )
        where = f"p{partition} on {trace.partition_port}, history on {trace.history_port}"
        lines.append(f"trace {trace.id[:8]} ({where}): {stages}")
    return "\n".join(lines)


def _ask(port: int, victim: int, *command: str) -> Any:
    if port == victim:
        return "(on the killed master)"
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        return client.execute_command(*command)
    except redis.RedisError as exc:
        return repr(exc)
    finally:
        client.close()


def _words(got: Received) -> int:
    return len(got.text().split())


async def test_a_master_killed_and_restarted_loses_and_repeats_nothing(
    cluster: OwnedCluster, deployment: Deployment
) -> None:
    settings = deployment.settings
    victim = cluster.ports[1]
    traces = _pick_traces(cluster, settings, victim)
    untouched = [t for t in traces if victim not in (t.partition_port, t.history_port)]
    gate = threading.Event()
    out: dict[str, Any] = {}
    app = threading.Thread(target=_app, args=(settings, traces, gate, out))
    received = [Received() for _ in traces]
    resumed = [0]
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        server = deployment.frontends[0]
        clients = [
            asyncio.create_task(_follow(http, _url(server, t.id), got, resumed))
            for t, got in zip(traces, received, strict=True)
        ]
        app.start()
        await wait_until_async(
            lambda: all(_words(got) >= HOLD_AT for got in received),
            within=60,
            what="every client at the hold point",
        )
        cluster.kill(victim)
        try:
            gate.set()
            # Down, and the traces that do not touch it go on to their end.
            try:
                await wait_until_async(
                    lambda: all(
                        got.ended for t, got in zip(traces, received, strict=True) if t in untouched
                    ),
                    within=60,
                    what="the traces on the live masters streaming while one master is down",
                )
            except AssertionError as exc:
                state = await asyncio.to_thread(_progress, settings, traces, received, victim)
                raise AssertionError(
                    f"{exc}\npublisher: {out['publisher'].stats}\n{state}"
                ) from None
            await asyncio.sleep(DOWN_S)
        finally:
            await asyncio.to_thread(cluster.restart, victim)
        await asyncio.wait_for(asyncio.gather(*clients), timeout=120)
    await asyncio.to_thread(app.join, 90)
    assert "failure" not in out, out.get("failure")
    # Nothing was dropped: what could not reach the dead master waited in the buffer.
    assert out["flushed"] and out["stats"].dropped == 0, out["stats"]
    for trace, got in zip(traces, received, strict=True):
        _assert_whole(got, trace.text())
    await _trees_complete(settings, [t.id for t in traces])
    _webhooks_verify(deployment, [t.id for t in traces])
