"""Fault scenarios at size: what every consumer lost or duplicated while workers and Redis died.

``python -m bench.chaos [--traces N] [--words W] [--seed S] [--replicas R]`` (``make chaos``)

Owns a redis-server on a free loopback port (AOF on, fsync always, so every
acknowledged write survives a SIGKILL) and starts R replicas of each worker
(fan-out, traces, webhooks) from their arq command lines, plus a webhook
receiver process. The app in this process streams N traces of W words each
(``2W - 1`` tokens: words and spaces) through the real callback handler
(``N * (2W + 1)`` events, 19,998 by default) while a fault loop, seeded,
keeps doing one of:

- SIGKILL a random worker replica, and start a new one in its place;
- SIGKILL Redis, then restart it on the same port from its AOF;
- SIGSTOP Redis for longer than the clients' socket timeouts, then SIGCONT.

Once the app is done and the faults stop, it waits (bounded) for every
consumer to settle and compares with what the app produced:

- fan-out: each trace's history text against the text the app streamed
  (words and spaces missing or repeated, traces whose text is out of order,
  traces without their final event);
- traces: each trace's tree complete, successful, with every token counted once;
- webhooks: per produced ``chat_model.start``/``llm.end`` event, the
  webhook-ids the receiver got (none: lost; more than one: duplicated).
  The same webhook-id arriving twice is at-least-once delivery, not a
  duplicate: receivers deduplicate by it; it is counted under ``info``.

Last line: one JSON object, ``{"fanout": {...}, "traces": {...}, "webhooks":
{...}, "info": {...}}``; every figure outside ``info`` should be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
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

from bench._support import report
from bus.demo.ports import free_port
from bus.events import decode
from bus.history import Topic, read_after
from bus.keys import Keys
from bus.producer.callbacks import BusCallbackHandler
from bus.producer.publisher import Publisher
from bus.settings import Settings
from bus.traces.queries import get_trace
from bus.webhooks.endpoints import Endpoints
from bus.webhooks.outbox import webhook_id
from bus.webhooks.types import webhook_type

ROOT = Path(__file__).resolve().parents[1]
RECEIVER = ROOT / "tests" / "support" / "webhook_receiver.py"
WORKERS = {
    "fanout": "workers.fanout.WorkerSettings",
    "traces": "workers.traces.WorkerSettings",
    "webhooks": "workers.webhooks.WorkerSettings",
}
HOOKED = ("chat_model.start", "llm.end")
STOP_S = 7.0  # past the publisher's (5 s) and the workers' (read block + 5 s) socket timeouts
SETTLE_S = 240.0


class ChaosRedis:
    """A redis-server of this run's own, with its AOF, to kill, stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="lcbus-chaos-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def signal(self, sig: int) -> None:
        if self.process is not None:
            self.process.send_signal(sig)

    def close(self) -> None:
        self.signal(signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Fleet:
    """R replicas of each worker, started from arq's command line."""

    def __init__(self, settings: Settings, replicas: int, log_dir: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **settings.to_env()}
        self.env.pop("REDIS_URL", None)
        self.log_dir = log_dir
        self.procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        for kind in WORKERS:
            for n in range(replicas):
                self.start(kind, n)

    def start(self, kind: str, n: int) -> None:
        with (self.log_dir / f"{kind}-{n}.log").open("ab") as log:
            self.procs[kind, n] = subprocess.Popen(
                [sys.executable, "-m", "arq", WORKERS[kind]],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=log,
            )

    def kill_one(self, rng: random.Random) -> str:
        kind, n = rng.choice(sorted(self.procs))
        proc = self.procs[kind, n]
        proc.kill()
        proc.wait()
        self.start(kind, n)
        return kind

    def close(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RecordingPublisher(Publisher):
    """The real publisher, also keeping every event the app handed it (what it produced)."""

    def __init__(self, *, settings: Settings) -> None:
        super().__init__(settings=settings)
        self.produced: list[bytes] = []

    def publish(self, partition: int, payload: bytes) -> None:
        self.produced.append(payload)
        super().publish(partition, payload)


class PacedModel(GenericFakeChatModel):
    """A fake chat model streaming one word per chunk, ``pause_s`` apart (a live run)."""

    pause_s: float = 0.0

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in super()._stream(messages, stop, run_manager, **kwargs):
            time.sleep(self.pause_s)
            yield chunk


def words(trace: int, count: int) -> str:
    return " ".join(f"t{trace}w{i}" for i in range(count))


def run_app(
    settings: Settings, traces: int, word_count: int, pause_s: float
) -> tuple[dict[str, str], RecordingPublisher]:
    """Stream every trace through the handler; trace id -> the text the app produced."""
    publisher = RecordingPublisher(settings=settings)
    handler = BusCallbackHandler(settings=settings, publisher=publisher)
    produced: dict[str, str] = {}
    for n in range(traces):
        text = words(n, word_count)
        run_id = uuid.uuid4()
        model = PacedModel(messages=iter([AIMessage(content=text)]), pause_s=pause_s)
        config: Any = {"run_id": run_id, "callbacks": [handler]}
        assert "".join(str(c.content) for c in model.stream("q", config=config)) == text
        produced[str(run_id)] = text
    publisher.flush(timeout=120)
    return produced, publisher


def fault_loop(
    stop: threading.Event, rng: random.Random, server: ChaosRedis, fleet: Fleet, log: Counter[str]
) -> None:
    while not stop.wait(rng.uniform(1.0, 2.5)):
        roll = rng.random()
        if roll < 0.7:
            log["worker_kills_" + fleet.kill_one(rng)] += 1
        elif roll < 0.85:
            server.kill()
            time.sleep(rng.uniform(0.2, 1.0))
            server.start()
            log["redis_kills"] += 1
        else:
            server.signal(signal.SIGSTOP)
            time.sleep(STOP_S)
            server.signal(signal.SIGCONT)
            log["redis_stops"] += 1


async def history_texts(
    client: aioredis.Redis, settings: Settings, trace: str
) -> tuple[list[str], bool]:
    items = await read_after(
        client, Keys(settings.prefix), Topic("trace", trace), None, count=1_000_000
    )
    texts: list[str] = []
    for item in items:
        data = json.loads(item.payload)["params"]["data"]
        if item.method == "messages" and data.get("event") == "content-block-delta":
            texts.append(data["delta"]["text"])
    return texts, bool(items) and items[-1].final


_WORD = re.compile(r"t\d+w\d+")


def text_diff(expected: str, got: str) -> tuple[int, int]:
    """(missing, repeated) words and spaces of ``got`` against ``expected``.

    Every word of a trace is unique, so a repeated token shows as a word seen
    twice (or a space too many); the fan-out worker may merge deltas, so the
    texts are compared, not the deltas.
    """
    want, have = Counter(_WORD.findall(expected)), Counter(_WORD.findall(got))
    spaces = expected.count(" ") - got.count(" ")
    missing = sum((want - have).values()) + max(0, spaces)
    repeated = sum((have - want).values()) + max(0, -spaces)
    return missing, repeated


async def settled(client: aioredis.Redis, settings: Settings, produced: dict[str, str]) -> bool:
    for trace in produced:
        _, final = await history_texts(client, settings, trace)
        tree = await get_trace(client, settings, trace)
        if not final or tree is None or tree.status != "success":
            return False
    return True


async def wait_settled(
    client: aioredis.Redis,
    settings: Settings,
    produced: dict[str, str],
    expected_hooks: set[str],
    receiver: httpx.AsyncClient,
) -> list[dict[str, Any]]:
    """Poll until every trace is final and complete and every webhook arrived (bounded)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        arrivals: list[dict[str, Any]] = (await receiver.get("/received/chaos")).json()
        seen = {a["headers"]["webhook-id"] for a in arrivals}
        done = expected_hooks <= seen and await settled(client, settings, produced)
        if done or time.monotonic() > deadline:
            return arrivals
        await asyncio.sleep(1.0)


async def judge_trace(
    client: aioredis.Redis, settings: Settings, trace: str, text: str
) -> tuple[Counter[str], Counter[str]]:
    """(fan-out figures, tree figures) of one trace against the text the app produced."""
    fanout, tree_figures = Counter[str](), Counter[str]()
    deltas, final = await history_texts(client, settings, trace)
    got = "".join(deltas)
    missing, repeated = text_diff(text, got)
    fanout["tokens_lost"] += missing
    fanout["tokens_duplicated"] += repeated
    fanout["traces_reordered"] += int(not missing and not repeated and got != text)
    fanout["traces_unfinished"] += int(not final)
    tree = await get_trace(client, settings, trace)
    root = tree.root if tree is not None and tree.status == "success" else None
    tree_figures["trees_incomplete"] += int(root is None)
    if root is not None:
        chunks = len([c for c in re.split(r"(\s)", text) if c])
        tree_figures["tokens_lost"] += max(0, chunks - root.token_count)
        tree_figures["tokens_duplicated"] += max(0, root.token_count - chunks)
        tree_figures["outputs_wrong"] += int(text not in json.dumps(root.outputs))
    return fanout, tree_figures


def judge_webhooks(expected: dict[str, Any], arrivals: list[dict[str, Any]]) -> dict[str, int]:
    """Lost: a produced event no webhook arrived for. Duplicated: one event (its trace, run
    and type) under more than one webhook-id. The same id twice is a redelivery."""
    ids_by_identity: dict[tuple[str, str, str], set[str]] = {}
    for arrival in arrivals:
        body = json.loads(arrival["body"])
        identity = (body["data"]["trace_id"], body["data"]["run_id"], body["type"])
        ids_by_identity.setdefault(identity, set()).add(arrival["headers"]["webhook-id"])
    arrived = Counter(a["headers"]["webhook-id"] for a in arrivals)
    return {
        "lost": sum(1 for msg_id in expected if not arrived[msg_id]),
        "duplicated": sum(len(ids) - 1 for ids in ids_by_identity.values()),
        "redelivered_same_id": sum(n - 1 for n in arrived.values()),
    }


async def measure(
    settings: Settings, produced: dict[str, str], events: list[Any], receiver: httpx.AsyncClient
) -> dict[str, Any]:
    client = aioredis.Redis.from_url(settings.redis_url)
    expected_hooks = {webhook_id(e): e for e in events if webhook_type(e) in HOOKED}
    arrivals = await wait_settled(client, settings, produced, set(expected_hooks), receiver)
    fanout, traces = (
        Counter[str](),
        Counter[str](
            {"trees_incomplete": 0, "tokens_lost": 0, "tokens_duplicated": 0, "outputs_wrong": 0}
        ),
    )
    for trace, text in produced.items():
        one_fanout, one_tree = await judge_trace(client, settings, trace, text)
        fanout.update(one_fanout)
        traces.update(one_tree)
    await client.aclose()
    webhooks = judge_webhooks(expected_hooks, arrivals)
    return {
        "fanout": dict(sorted(fanout.items())),
        "traces": dict(sorted(traces.items())),
        "webhooks": {"lost": webhooks["lost"], "duplicated": webhooks["duplicated"]},
        "redelivered_same_id": webhooks["redelivered_same_id"],
        "webhooks_expected": len(expected_hooks),
    }


@contextlib.contextmanager
def receiver_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(RECEIVER), str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=198)
    parser.add_argument("--words", type=int, default=50, help="words per trace")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pause-ms", type=float, default=3.0, help="between two tokens")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    server = ChaosRedis()
    server.start()
    settings = Settings(
        redis_url=server.url,
        prefix="lcbus-chaos",
        partitions=8,
        lease_ttl_ms=2000,
        webhook_schedule="0,1,2,4,8,8,8,8,8,8",
        webhook_jitter=0.2,
        webhook_allow_networks="127.0.0.0/8",
        trace_complete_timeout_s=600,
    )
    faults: Counter[str] = Counter()
    log_dir = Path(tempfile.mkdtemp(prefix="lcbus-chaos-logs-"))
    started = time.monotonic()
    cleanup = contextlib.ExitStack()
    try:
        with receiver_process() as receiver_url:
            registry_client = aioredis.Redis.from_url(server.url)

            async def register() -> None:
                registry = Endpoints(redis=registry_client, settings=settings)
                await registry.add(f"{receiver_url}/hook/chaos", events=list(HOOKED))
                await registry_client.aclose()

            asyncio.run(register())
            fleet = Fleet(settings, args.replicas, log_dir)
            cleanup.callback(fleet.close)
            stop = threading.Event()
            chaos = threading.Thread(target=fault_loop, args=(stop, rng, server, fleet, faults))
            time.sleep(2)  # workers up before the first fault
            chaos.start()
            try:
                pause_s = args.pause_ms / 1000
                produced, publisher = run_app(settings, args.traces, args.words, pause_s)
            finally:
                stop.set()
                chaos.join()
            stats = publisher.stats
            events = [decode(p) for p in publisher.produced]
            publisher.close()

            async def judge() -> dict[str, Any]:
                async with httpx.AsyncClient(base_url=receiver_url, timeout=30) as http:
                    return await measure(settings, produced, events, http)

            figures = asyncio.run(judge())
    finally:
        cleanup.close()
        server.close()
    info = {
        "events": len(events),
        "traces": len(produced),
        "publisher_dropped": stats.dropped,
        "webhooks_expected": figures.pop("webhooks_expected"),
        "webhooks_redelivered_same_id": figures.pop("redelivered_same_id"),
        **dict(sorted(faults.items())),
        "seconds": round(time.monotonic() - started, 1),
        "worker_logs": str(log_dir),
    }
    report({**figures, "info": info})


if __name__ == "__main__":
    main()
