"""A test worker: records every delivery into Redis under the test's prefix.

Started by the process tests as ``arq tests.support.probe_worker.WorkerSettings``
with ``LCBUS_*`` variables for its settings and ``PROBE_*`` for behaviour:

- ``PROBE_DELAY_MS``: sleep per batch, so that a kill lands mid-stream;
- events whose metadata has ``fail`` raise while the key ``{prefix}:probe:failing`` exists.

Each batch appends ``"partition/entry_id trace_id seq pid"`` lines to ``{prefix}:probe:handled``
in one RPUSH, so a batch is recorded whole or not at all.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from bus.runtime.consumer import BatchHandler, Delivery
from bus.runtime.worker import WorkerContext, consumer_worker_settings

GROUP = os.environ.get("PROBE_GROUP", "probe")


def handled_key(prefix: str) -> str:
    return f"{prefix}:probe:handled"


def failing_key(prefix: str) -> str:
    return f"{prefix}:probe:failing"


async def build_handler(ctx: WorkerContext) -> BatchHandler:
    delay = int(os.environ.get("PROBE_DELAY_MS", "0")) / 1000
    pid = os.getpid()
    prefix = ctx.settings.prefix

    async def handle(batch: Sequence[Delivery]) -> None:
        if delay:
            await asyncio.sleep(delay)
        for d in batch:
            if d.event.metadata.get("fail") and await ctx.redis.exists(failing_key(prefix)):
                raise RuntimeError(f"probe refuses {d.event.id}")
        lines = [
            f"{d.partition}/{d.entry_id} {d.event.trace_id} {d.event.seq} {pid}" for d in batch
        ]
        await ctx.redis.rpush(handled_key(prefix), *lines)

    return handle


WorkerSettings = consumer_worker_settings(worker="probe", group=GROUP, build_handler=build_handler)
