"""The whole bus on a 3-master Redis Cluster, as real processes: an app, the three
workers with two replicas each, two frontends and SSE clients that reconnect
mid-stream. Trees complete, webhooks verify, and every client gets every event
once, also while slots are resharded.
arq's queue lives on the standalone Redis, as a cluster deployment has it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from bus.connect import async_client
from bus.keys import Keys
from bus.settings import Settings
from bus.tokens import stream_token
from bus.traces.queries import get_trace
from bus.webhooks.endpoints import Endpoints
from tests.conftest import REDIS_URL, require_redis
from tests.processes.test_fanout_processes import _app, _assert_whole, _text
from tests.support.frontend import SECRET, Frontend, Received, collect, frontend
from tests.support.processes import start_worker, stop
from tests.support.redis_cluster import OwnedCluster
from tests.support.waiting import wait_until
from tests.support.webhooks import LOOPBACK, Receiver, start_receiver

WORKERS = ("fanout", "traces", "webhooks")
HOOK = "cluster"
CUT_AFTER = 25
"""Events a reconnecting client reads before it drops and resumes on the other frontend."""


@dataclass
class Deployment:
    settings: Settings
    frontends: list[Frontend]
    receiver: Receiver
    secret: str
    workers: dict[str, list[subprocess.Popen[bytes]]]


@pytest.fixture(scope="module")
def deployment(
    cluster: OwnedCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
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
    logs = tmp_path_factory.mktemp("cluster-processes")
    receiver_cm = start_receiver()
    receiver = next(receiver_cm)
    secret = asyncio.run(_register(settings, receiver.url(HOOK)))
    workers = {
        name: [
            start_worker(
                settings, logs / f"{name}-{i}.log", target=f"workers.{name}.WorkerSettings"
            )
            for i in range(2)
        ]
        for name in WORKERS
    }
    env = {
        "LCBUS_PARTITIONS": "8",
        "LCBUS_QUEUE_REDIS_URL": REDIS_URL,
        "LCBUS_PING_INTERVAL_S": "1",
    }
    try:
        with (
            frontend(cluster.url, settings.prefix, **env) as a,
            frontend(cluster.url, settings.prefix, **env) as b,
        ):
            _wait_members(settings)
            yield Deployment(settings, [a, b], receiver, secret, workers)
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


async def _register(settings: Settings, url: str) -> str:
    client = async_client(settings)
    try:
        endpoint = await Endpoints(redis=client, settings=settings).add(
            url, events=["llm.end", "trace.completed"]
        )
    finally:
        await client.aclose()
    return endpoint.secrets[0].value


def _wait_members(settings: Settings, replicas: int = 2) -> None:
    client = redis.cluster.RedisCluster.from_url(settings.redis_url)
    keys = Keys(settings.prefix, settings.partitions)
    try:
        wait_until(
            lambda: all(client.zcard(keys.members(w)) == replicas for w in WORKERS),
            within=60,
            what=f"{replicas} replicas of each worker in their groups",
        )
    finally:
        client.close()


def _delete(cluster: OwnedCluster, prefix: str) -> None:
    for port in [*cluster.ports, int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])]:
        client = redis.Redis(port=port)
        try:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
        except redis.RedisError:
            pass
        finally:
            client.close()


def _url(server: Frontend, trace: str) -> str:
    return f"{server.url}/traces/{trace}/stream?token={stream_token(trace, secret=SECRET)}"


async def _reconnecting(
    http: httpx.AsyncClient, servers: list[Frontend], trace: str, started: asyncio.Event
) -> Received:
    """Reads some events from one frontend, drops, and resumes on the other one."""
    first = await collect(http, "GET", _url(servers[0], trace), limit=CUT_AFTER, started=started)
    header = {"Last-Event-ID": first.ids[-1]}
    rest = await collect(http, "GET", _url(servers[1], trace), headers=header)
    return Received(
        envelopes=first.envelopes + rest.envelopes,
        ids=first.ids + rest.ids,
        error=rest.error,
        ended=rest.ended,
    )


async def _stream(deployment: Deployment, traces: int, meanwhile: Callable[[], None]) -> None:
    """Run ``traces`` traces through the app while ``meanwhile`` runs; check everything."""
    settings = deployment.settings
    run_ids = [uuid.uuid4() for _ in range(traces)]
    ids = [str(r) for r in run_ids]
    failures: list[BaseException] = []
    app = threading.Thread(target=_app, args=(settings, run_ids, failures))
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as http:
        started = [asyncio.Event() for _ in range(2 * traces)]
        clients = []
        for n, trace in enumerate(ids):
            clients.append(
                asyncio.create_task(
                    _reconnecting(http, deployment.frontends, trace, started[2 * n])
                )
            )
            clients.append(
                asyncio.create_task(
                    collect(
                        http,
                        "GET",
                        _url(deployment.frontends[1], trace),
                        started=started[2 * n + 1],
                    )
                )
            )
        await asyncio.gather(*(event.wait() for event in started))
        app.start()
        await asyncio.to_thread(meanwhile)
        received = await asyncio.wait_for(asyncio.gather(*clients), timeout=150)
    await asyncio.to_thread(app.join, 60)
    assert not failures
    for n, got in enumerate(received):
        _assert_whole(got, _text(n // 2))
    await _trees_complete(settings, ids)
    _webhooks_verify(deployment, ids)


async def _trees_complete(settings: Settings, traces: list[str]) -> None:
    client = async_client(settings)
    try:
        for _ in range(600):
            trees = [await get_trace(client, settings, t) for t in traces]
            if all(tree is not None and tree.status == "success" for tree in trees):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"trees not complete: {[t and t.status for t in trees]}")
    finally:
        await client.aclose()


def _webhooks_verify(deployment: Deployment, traces: list[str]) -> None:
    """One trace.completed and one llm.end per trace, each signed; a retry keeps its id."""

    def by_id() -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for request in deployment.receiver.received(HOOK):
            body = json.loads(request["body"])
            if body["data"]["trace_id"] in traces:
                found[request["headers"]["webhook-id"]] = body
                Webhook(deployment.secret).verify(request["body"], request["headers"])
        return found

    expected = sorted((t, kind) for t in traces for kind in ("llm.end", "trace.completed"))
    try:
        wait_until(lambda: len(by_id()) == 2 * len(traces), within=60, what="every webhook")
    except AssertionError as exc:
        got = {(body["data"]["trace_id"], body["type"]) for body in by_id().values()}
        raise AssertionError(f"{exc}: missing {sorted(set(expected) - got)}") from None
    kinds = sorted((body["data"]["trace_id"], body["type"]) for body in by_id().values())
    assert kinds == expected


def _first_trace_streaming(settings: Settings) -> None:
    client = redis.cluster.RedisCluster.from_url(settings.redis_url)
    keys = Keys(settings.prefix, settings.partitions)
    try:
        wait_until(
            lambda: any(client.exists(keys.events(p)) for p in range(settings.partitions)),
            within=30,
            what="the app publishing",
        )
    finally:
        client.close()


async def test_the_bus_runs_end_to_end_on_the_cluster(deployment: Deployment) -> None:
    await _stream(deployment, 3, lambda: None)


async def test_resharding_while_traces_stream_loses_and_repeats_nothing(
    cluster: OwnedCluster, deployment: Deployment
) -> None:
    settings = deployment.settings
    source, target = cluster.ports[0], cluster.ports[1]

    def reshard() -> None:
        _first_trace_streaming(settings)
        # A sixth of the slots: traces' keys move, and partition streams with them.
        cluster.reshard(source=source, target=target, slots=1000)

    try:
        await _stream(deployment, 3, reshard)
    finally:
        cluster.reshard(source=target, target=source, slots=1000)
