"""The trace worker: builds each trace's run tree from the event partitions.

Run with ``arq workers.traces.WorkerSettings`` (any number of replicas; the
consumer runtime gives each partition one active reader at a time).
"""

from __future__ import annotations

from bus.runtime.consumer import BatchHandler
from bus.runtime.worker import WorkerContext, consumer_worker_settings
from bus.traces.aggregator import TraceAggregator


async def build_handler(ctx: WorkerContext) -> BatchHandler:
    aggregator = TraceAggregator(redis=ctx.redis, settings=ctx.settings)
    aggregator.start()
    ctx.arq["trace_aggregator"] = aggregator
    return aggregator


async def stop(ctx: WorkerContext) -> None:
    aggregator: TraceAggregator | None = ctx.arq.get("trace_aggregator")
    if aggregator is not None:
        await aggregator.aclose()


WorkerSettings = consumer_worker_settings(
    worker="traces", group="traces", build_handler=build_handler, on_shutdown=stop
)
