"""The webhook worker's factory: route bus events to attempt jobs, and run them.

``workers/webhooks.py`` is ``WorkerSettings = worker_settings()``. The worker
consumes the bus as group ``webhooks``: the batch handler
(:class:`bus.webhooks.router.Router`) turns each event into one attempt job per
matching endpoint, and the same process runs those jobs
(:func:`bus.webhooks.delivery.deliver_webhook`) from its arq queue. Run as many
replicas as you like: partitions are shared through leases, and attempt jobs
through arq's queue.

``max_jobs`` is high (``LCBUS_WEBHOOK_MAX_JOBS``) because an attempt mostly
waits on the network; an endpoint's own concurrency limit, kept in Redis,
stops one slow endpoint from taking all of them.
"""

from __future__ import annotations

from arq.worker import func
from redis.asyncio import BlockingConnectionPool

from bus.runtime.arqpool import PrefixedArqRedis
from bus.runtime.consumer import BatchHandler
from bus.runtime.worker import WorkerContext, consumer_worker_settings
from bus.settings import Settings
from bus.webhooks.delivery import Deliverer, deliver_webhook
from bus.webhooks.outbox import JOB_FUNCTION, WORKER
from bus.webhooks.router import Router

_SPARE_CONNECTIONS = 16
"""arq's own poll, heartbeat and abort checks, beside the jobs."""


async def build_router(ctx: WorkerContext) -> BatchHandler:
    """The :data:`bus.runtime.worker.HandlerFactory` of the webhook worker.

    Also provides the :class:`Deliverer` that ``deliver_webhook`` jobs use.
    """
    # Each of max_jobs running attempts may use arq's own pool at once
    # (run_job, finish_job); redis-py's default cap of 100 connections would
    # make the surplus fail with MaxConnectionsError, failing the job's task
    # and with it arq's close() on shutdown.
    arq_pool = ctx.arq["redis"].connection_pool
    arq_pool.max_connections = max(
        arq_pool.max_connections, ctx.settings.webhook_max_jobs + _SPARE_CONNECTIONS
    )
    # Attempts and enqueues get a pool of their own that waits for a free
    # connection: hundreds of concurrent attempts on the consumer's or arq's
    # pool would exhaust it (redis-py then raises instead of waiting) and
    # starve the consumer and arq's own polling.
    pool = BlockingConnectionPool.from_url(
        ctx.settings.redis_url, max_connections=ctx.settings.webhook_redis_connections, timeout=30
    )
    client = PrefixedArqRedis(pool, prefix=ctx.settings.prefix)
    ctx.cleanup.push_async_callback(client.aclose, close_connection_pool=True)
    deliverer = Deliverer(redis=client, arq=client, settings=ctx.settings)
    ctx.cleanup.push_async_callback(deliverer.aclose)
    ctx.provide(deliverer)
    return Router(redis=client, arq=client, settings=ctx.settings)


def worker_settings(settings: Settings | None = None) -> type:
    """arq ``WorkerSettings`` of the webhook worker (settings from the environment by default)."""
    cfg = Settings.from_env() if settings is None else settings
    # The attempt bounds its own time; arq's limit is only a backstop. A job
    # whose worker died runs again once arq's in-progress mark (job_timeout + 10 s) expires.
    backstop_s = cfg.webhook_timeout_s + 5
    return consumer_worker_settings(
        worker=WORKER,
        group=WORKER,
        build_handler=build_router,
        functions=[func(deliver_webhook, name=JOB_FUNCTION, timeout=backstop_s)],
        settings=cfg,
        max_jobs=cfg.webhook_max_jobs,
        poll_delay=cfg.webhook_poll_delay_ms / 1000,
        job_timeout=backstop_s,
    )
