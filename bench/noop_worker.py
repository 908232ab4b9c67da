"""The consume baseline of ``bench.traces``: a worker whose handler does nothing.

The runtime still reads, decodes and acknowledges every entry, so comparing
with ``workers.traces`` isolates the cost of aggregating run trees.
"""

from __future__ import annotations

from collections.abc import Sequence

from bus.runtime.consumer import BatchHandler, Delivery
from bus.runtime.worker import WorkerContext, consumer_worker_settings


async def _ignore(batch: Sequence[Delivery]) -> None:
    return None


async def build_handler(ctx: WorkerContext) -> BatchHandler:
    return _ignore


WorkerSettings = consumer_worker_settings(
    worker="noop", group="traces", build_handler=build_handler
)
