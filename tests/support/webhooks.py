"""Shared pieces of the webhook tests: a receiver process, events, an in-process worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from arq import Worker
from arq.worker import func

from bus.demo.ports import free_port
from bus.events import ChainEnd, CustomEvent, LLMNewToken, ToolEnd, new_event_id
from bus.keys import Keys
from bus.runtime.arqpool import arq_pool
from bus.runtime.jobstarts import claim_jobs_in_one_round_trip
from bus.runtime.worker import WorkerContext
from bus.settings import Settings
from bus.webhooks.delivery import Deliverer, deliver_webhook
from bus.webhooks.outbox import JOB_FUNCTION, WORKER
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
RECEIVER = ROOT / "tests" / "support" / "webhook_receiver.py"
LOOPBACK = "127.0.0.0/8,::1/128"


class Receiver:
    """The receiver process: configure paths, read what arrived."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    def configure(self, name: str, **config: Any) -> None:
        self.client.put(f"/config/{name}", json=config).raise_for_status()

    def received(self, name: str) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.client.get(f"/received/{name}").json()
        return got


def start_receiver() -> Iterator[Receiver]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(RECEIVER), str(port)], cwd=ROOT)
    receiver = Receiver(port)
    try:
        wait_until(lambda: _answers(receiver, proc), within=20, what="webhook receiver up")
        yield receiver
    finally:
        receiver.client.close()
        proc.terminate()
        proc.wait(10)


def _answers(receiver: Receiver, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"webhook receiver exited with {proc.returncode}")
    try:
        receiver.client.get("/health").raise_for_status()
    except httpx.HTTPError:
        return False
    return True


def chain_end(trace: str = "t1", **fields: Any) -> ChainEnd:
    return ChainEnd(
        id=new_event_id(), time=time.time(), run_id=trace, trace_id=trace, seq=1, **fields
    )


def tool_end(trace: str = "t1", **fields: Any) -> ToolEnd:
    return ToolEnd(
        id=new_event_id(), time=time.time(), run_id=trace, trace_id=trace, seq=2, **fields
    )


def token(trace: str = "t1") -> LLMNewToken:
    return LLMNewToken(
        id=new_event_id(), time=time.time(), run_id=trace, trace_id=trace, seq=3, token="hi"
    )


def custom(name: str, trace: str = "t1") -> CustomEvent:
    return CustomEvent(
        id=new_event_id(),
        time=time.time(),
        run_id=trace,
        trace_id=trace,
        seq=4,
        event_name=name,
        data={"x": 1},
    )


def webhook_settings(settings: Settings, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_allow_networks": LOOPBACK,
        "webhook_schedule": "0,0.2,0.2",
        "webhook_jitter": 0.0,
        "webhook_timeout_s": 2.0,
    }
    values.update(changes)
    return settings.replace(**values)


async def run_jobs(settings: Settings, redis: aioredis.Redis) -> None:
    """Run the webhook queue in this process until it is empty (deferred jobs included)."""
    arq = arq_pool(settings)
    async with Deliverer(redis=redis, arq=arq, settings=settings) as deliverer:
        ctx: dict[str, Any] = {}
        WorkerContext(settings=settings, redis=redis, arq=ctx).provide(deliverer)
        worker = Worker(
            functions=[func(deliver_webhook, name=JOB_FUNCTION)],
            queue_name=Keys(settings.prefix, settings.partitions).arq_queue(WORKER),
            redis_pool=arq,
            burst=True,
            poll_delay=0.02,
            handle_signals=False,
            max_jobs=50,
            ctx=ctx,
            log_results=False,
        )
        # As the worker process does (bus.runtime.worker): one round trip per job start.
        claim_jobs_in_one_round_trip(worker, keys=Keys(settings.prefix, settings.partitions))
        try:
            await worker.main()
        finally:
            # Worker.close() calls the redis client's deprecated close().
            await asyncio.gather(*worker.tasks.values())
            await arq.aclose()
