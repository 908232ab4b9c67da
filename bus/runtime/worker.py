"""arq glue: run a :class:`~bus.runtime.consumer.GroupConsumer` inside an arq worker.

Each stage package has a ``worker`` module whose factory calls
:func:`consumer_worker_settings`; a worker module is then one line::

    WorkerSettings = worker_settings()

and is started with ``arq workers.traces.WorkerSettings``. arq's own job
queue (``{prefix}:arq:{worker}``) runs beside the consumer for jobs such as
webhook attempts, each started with one round trip
(:mod:`bus.runtime.jobstarts`); ``arq --check`` reads the health key arq
keeps fresh.
The consumer and handlers use the data plane's Redis (a cluster or not, see
:mod:`bus.connect`); arq's keys live on ``LCBUS_QUEUE_REDIS_URL``, a
standalone Redis (the data plane's own Redis when that is standalone).
A stage's handler factory registers the closing of whatever it opened on
:attr:`WorkerContext.cleanup`. On SIGTERM the consumer finishes and
acknowledges its batch in hand and releases its leases; arq then calls
``on_shutdown``, which closes that stack.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from arq import func
from arq.connections import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from bus.connect import async_client, queue_url
from bus.keys import Keys
from bus.runtime.arqpool import arq_pool
from bus.runtime.consumer import BatchHandler, GroupConsumer
from bus.runtime.jobstarts import claim_jobs_in_one_round_trip, running_worker
from bus.runtime.metrics import MetricsExporter
from bus.settings import Settings

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 10
_BACKOFF_CAP_S = 1.0


_CONTEXT_KEY = "bus"
"""The one key the runtime keeps in arq's ctx: the :class:`WorkerContext`."""

ServiceT = TypeVar("ServiceT")


@dataclass
class WorkerContext:
    """What a stage's handler factory and its arq jobs share in one worker process.

    Creating one attaches it to arq's ctx, where :func:`worker_context` finds it.
    """

    settings: Settings
    redis: aioredis.Redis
    """A bytes client (decode_responses=False) for handlers and jobs."""
    arq: dict[str, Any]
    """arq's ctx; ``arq["redis"]`` is the ArqRedis pool (for ``enqueue_job``)."""
    cleanup: AsyncExitStack = field(default_factory=AsyncExitStack)
    """Closed at shutdown, last in first out, after the consumer has stopped."""
    consumer: GroupConsumer | None = None
    shutdown_task: asyncio.Task[None] | None = field(default=None, repr=False)
    """The signal handler's stop task (referenced here so that it is not collected)."""
    _services: dict[type, object] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.arq[_CONTEXT_KEY] = self

    def provide(self, service: object) -> None:
        """Make ``service`` available to this worker's jobs, looked up by its type."""
        self._services[type(service)] = service

    def service(self, kind: type[ServiceT]) -> ServiceT:
        """The object of type ``kind`` the handler factory provided."""
        found = self._services.get(kind)
        if not isinstance(found, kind):
            raise LookupError(f"this worker provides no {kind.__name__}")
        return found


def worker_context(ctx: Mapping[str, Any]) -> WorkerContext:
    """The :class:`WorkerContext` of the worker running an arq job with ``ctx``."""
    found = ctx.get(_CONTEXT_KEY)
    if not isinstance(found, WorkerContext):
        raise LookupError("this arq worker was not built by consumer_worker_settings")
    return found


HandlerFactory = Callable[[WorkerContext], Awaitable[BatchHandler]]
"""Builds a stage's batch handler at start-up; registers its cleanup on the context."""


def redis_client(settings: Settings) -> aioredis.Redis:
    """The bytes client a worker's consumer and handler share.

    The socket timeout bounds every call (no BLOCK is longer than
    read_block_ms), so a silently dead connection becomes an error to back
    off from instead of a hang.
    """
    return async_client(
        settings,
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


def _stop_on_signals(wctx: WorkerContext) -> None:
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
        if wctx.consumer is not None:
            await wctx.consumer.aclose()
        cancel_main()

    def on_signal(sig: signal.Signals) -> None:
        log.info("shutdown on %s", sig.name)
        wctx.shutdown_task = loop.create_task(stop())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def consumer_stats(ctx: dict[str, Any]) -> dict[str, int]:
    """arq job: the counters of this worker's consumer."""
    consumer = worker_context(ctx).consumer
    return {} if consumer is None else consumer.stats.as_dict()


async def _start_consumer(wctx: WorkerContext, group: str, build_handler: HandlerFactory) -> None:
    cfg = wctx.settings
    handler = await build_handler(wctx)
    consumer = GroupConsumer(redis=wctx.redis, settings=cfg, group=group, handler=handler)
    await consumer.start()
    wctx.consumer = consumer
    # Pushed after the handler's own cleanup, so closed before it: the
    # handler's resources outlive the consumer that calls it.
    wctx.cleanup.push_async_callback(_stop_consumer, consumer)
    if cfg.metrics_port:
        exporter = MetricsExporter(
            consumer=consumer, redis=wctx.redis, settings=cfg, port=cfg.metrics_port
        )
        await exporter.start()
        wctx.cleanup.push_async_callback(exporter.aclose)
    log.info("consumer %s of group %s started", consumer.replica_id, group)


async def _stop_consumer(consumer: GroupConsumer) -> None:
    await consumer.aclose()
    log.info("consumer %s stopped: %s", consumer.replica_id, consumer.stats.as_dict())


async def _shutdown(ctx: dict[str, Any]) -> None:
    wctx = ctx.get(_CONTEXT_KEY)
    if isinstance(wctx, WorkerContext):  # start-up may have failed before creating it
        await wctx.cleanup.aclose()


def consumer_worker_settings(
    *,
    worker: str,
    group: str,
    build_handler: HandlerFactory,
    functions: Sequence[Any] = (),
    settings: Settings | None = None,
    max_jobs: int | None = None,
    poll_delay: float | None = None,
    job_timeout: float | None = None,
) -> type:
    """A class usable as arq ``WorkerSettings`` that runs a consumer of ``group``.

    ``functions`` are arq jobs run beside the consumer (the default is
    ``consumer_stats``); ``max_jobs``, ``poll_delay`` and ``job_timeout``
    (seconds) are arq's options of the same names, arq's defaults when None.
    """
    cfg = Settings.from_env() if settings is None else settings

    async def startup(ctx: dict[str, Any]) -> None:
        queue_url(cfg)  # a clear ConfigError when the data plane is a cluster and arq is on it
        worker = running_worker()
        if worker is not None:
            claim_jobs_in_one_round_trip(worker, keys=Keys(cfg.prefix, cfg.partitions))
        wctx = WorkerContext(settings=cfg, redis=redis_client(cfg), arq=ctx)
        wctx.cleanup.push_async_callback(wctx.redis.aclose)
        _stop_on_signals(wctx)
        _ride_out_outages(ctx["redis"], cfg)
        await _start_consumer(wctx, group, build_handler)
        # What start-up made (modules, the handler's state) lives as long as the
        # process: frozen, it is left out of every collection, which then walks
        # only the batches' objects instead of the whole heap.
        gc.collect()
        gc.freeze()

    jobs = list(functions) or [func(consumer_stats, name="consumer_stats")]
    queue = Keys(cfg.prefix, cfg.partitions).arq_queue(worker)
    options = {"max_jobs": max_jobs, "poll_delay": poll_delay, "job_timeout": job_timeout}
    attrs: dict[str, Any] = {
        # arq reads these from the class __dict__, not through inheritance.
        "redis_settings": RedisSettings.from_dsn(cfg.redis_url),
        # arq's own job and result keys under the prefix (see bus.runtime.arqpool);
        # connections open on first use, inside the worker's event loop.
        "redis_pool": arq_pool(cfg, queue=queue, for_worker=True, socket_connect_timeout=2),
        "queue_name": queue,
        "functions": jobs,
        "on_startup": startup,
        "on_shutdown": _shutdown,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # Our handler (installed at start-up) replaces arq's: see _stop_on_signals.
        "handle_signals": False,
        **{name: value for name, value in options.items() if value is not None},
    }
    return type(f"{worker.title()}WorkerSettings", (), attrs)
