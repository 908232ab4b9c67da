"""The trace worker's factory: builds each trace's run tree from the event partitions.

``workers/traces.py`` is ``WorkerSettings = worker_settings()``, run with
``arq workers.traces.WorkerSettings`` (any number of replicas; the consumer
runtime gives each partition one active reader at a time).
"""

from __future__ import annotations

from bus.runtime.consumer import BatchHandler
from bus.runtime.worker import WorkerContext, consumer_worker_settings
from bus.settings import Settings
from bus.traces.aggregator import TraceAggregator

GROUP = "traces"


async def build_aggregator(ctx: WorkerContext) -> BatchHandler:
    """The :data:`bus.runtime.worker.HandlerFactory` of the trace worker."""
    aggregator = TraceAggregator(redis=ctx.redis, settings=ctx.settings)
    aggregator.start()
    ctx.cleanup.push_async_callback(aggregator.aclose)
    return aggregator


def worker_settings(settings: Settings | None = None) -> type:
    """arq ``WorkerSettings`` of the trace worker (settings from the environment by default)."""
    return consumer_worker_settings(
        worker=GROUP, group=GROUP, build_handler=build_aggregator, settings=settings
    )
