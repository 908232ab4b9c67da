"""arq glue: run a :class:`~bus.runtime.consumer.GroupConsumer` inside an arq worker.

A worker module does::

    WorkerSettings = consumer_worker_settings(
        worker="traces", group="traces", build_handler=build_handler
    )

and is started with ``arq workers.traces.WorkerSettings``. arq's own job
queue (``{prefix}:arq:{worker}``) runs beside the consumer for jobs such as
webhook attempts; ``arq --check`` reads the health key arq keeps fresh.
On SIGTERM arq cancels its poll loop and calls ``on_shutdown``, where the
consumer finishes and acknowledges its batch in hand and releases its leases.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from arq import func
from arq.connections import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from bus.keys import Keys
from bus.runtime.arqpool import arq_pool
from bus.runtime.consumer import BatchHandler, GroupConsumer
from bus.runtime.metrics import MetricsExporter
from bus.settings import Settings

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 10
_BACKOFF_CAP_S = 1.0


@dataclass
class WorkerContext:
    settings: Settings
    redis: aioredis.Redis
    """A bytes client (decode_responses=False) for handlers and jobs."""
    arq: dict[str, Any]
    """arq's ctx; ``arq["redis"]`` is the ArqRedis pool (for ``enqueue_job``)."""


HandlerFactory = Callable[[WorkerContext], Awaitable[BatchHandler]]


def redis_client(settings: Settings) -> aioredis.Redis:
    """The bytes client a worker's consumer and handler share.

    The socket timeout bounds every call (no BLOCK is longer than
    read_block_ms), so a silently dead connection becomes an error to back
    off from instead of a hang.
    """
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        socket_timeout=settings.read_block_ms / 1000 + 5,
        health_check_interval=30,
    )


def _ride_out_outages(arq_redis: aioredis.Redis, settings: Settings) -> None:
    # arq's poll loop lets a connection error end the worker; with retries
    # spanning outage_tolerance_s it waits for Redis instead. A longer
    # outage still ends the process, for its supervisor to restart.
    tries = max(1, int(settings.outage_tolerance_s / _BACKOFF_CAP_S))
    arq_redis.set_retry(Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), tries))


def _stop_on_signals(ctx: dict[str, Any]) -> None:
    """SIGTERM/SIGINT: release the partitions first, then end arq's main task.

    arq's own handler cancels its main task once, and under load that cancel
    can be lost (the worker then never exits), while a job task cancelled at
    the same time makes arq's close() skip on_shutdown. So: close the consumer
    (finish and ack the batch in hand, release leases at once), then cancel
    the main task (start-up runs inside it) until it is done. arq's close()
    then cancels running jobs (a cancelled attempt is retried by arq) and runs
    on_shutdown.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def cancel_main() -> None:
        if main is not None and not main.done():
            main.cancel()
            loop.call_later(1.0, cancel_main)  # a lost cancel is repeated

    async def stop() -> None:
        consumer: GroupConsumer | None = ctx.get("consumer")
        if consumer is not None:
            await consumer.aclose()
        cancel_main()

    def on_signal(sig: signal.Signals) -> None:
        log.info("shutdown on %s", sig.name)
        ctx["stopping"] = loop.create_task(stop())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def consumer_stats(ctx: dict[str, Any]) -> dict[str, int]:
    """arq job: the counters of this worker's consumer."""
    consumer: GroupConsumer = ctx["consumer"]
    return consumer.stats.as_dict()


def consumer_worker_settings(
    *,
    worker: str,
    group: str,
    build_handler: HandlerFactory,
    functions: Sequence[Any] = (),
    settings: Settings | None = None,
    on_shutdown: Callable[[WorkerContext], Awaitable[None]] | None = None,
) -> type:
    """A class usable as arq ``WorkerSettings`` that runs a consumer of ``group``."""
    cfg = Settings.from_env() if settings is None else settings

    async def startup(ctx: dict[str, Any]) -> None:
        _stop_on_signals(ctx)
        _ride_out_outages(ctx["redis"], cfg)
        client = redis_client(cfg)
        wctx = WorkerContext(settings=cfg, redis=client, arq=ctx)
        ctx["bus"] = wctx
        handler = await build_handler(wctx)
        consumer = GroupConsumer(redis=client, settings=cfg, group=group, handler=handler)
        await consumer.start()
        ctx["consumer"] = consumer
        if cfg.metrics_port:
            exporter = MetricsExporter(
                consumer=consumer, redis=client, settings=cfg, port=cfg.metrics_port
            )
            await exporter.start()
            ctx["metrics"] = exporter
        log.info("consumer %s of group %s started", consumer.replica_id, group)

    async def shutdown(ctx: dict[str, Any]) -> None:
        consumer: GroupConsumer | None = ctx.get("consumer")
        if consumer is not None:
            await consumer.aclose()
            log.info("consumer %s stopped: %s", consumer.replica_id, consumer.stats.as_dict())
        exporter: MetricsExporter | None = ctx.get("metrics")
        if exporter is not None:
            await exporter.aclose()
        wctx: WorkerContext | None = ctx.get("bus")
        if wctx is not None:
            if on_shutdown is not None:
                await on_shutdown(wctx)
            await wctx.redis.aclose()

    jobs = list(functions) or [func(consumer_stats, name="consumer_stats")]
    queue = Keys(cfg.prefix).arq_queue(worker)
    attrs: dict[str, Any] = {
        # arq reads these from the class __dict__, not through inheritance.
        "redis_settings": RedisSettings.from_dsn(cfg.redis_url),
        # arq's own job and result keys under the prefix (see bus.runtime.arqpool);
        # connections open on first use, inside the worker's event loop.
        "redis_pool": arq_pool(cfg, queue=queue, socket_connect_timeout=2),
        "queue_name": queue,
        "functions": jobs,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # Our handler (installed at start-up) replaces arq's: see _stop_on_signals.
        "handle_signals": False,
    }
    return type(f"{worker.title()}WorkerSettings", (), attrs)
