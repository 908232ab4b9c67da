"""The fan-out worker's factory: bus events -> protocol events in trace and thread history.

``workers/fanout.py`` is ``WorkerSettings = worker_settings()``, run with
``arq workers.fanout.WorkerSettings``. See :mod:`bus.fanout.handler`.
"""

from __future__ import annotations

from bus.fanout.handler import FanoutHandler
from bus.runtime.consumer import BatchHandler
from bus.runtime.resp_link import RespLink
from bus.runtime.worker import WorkerContext, consumer_worker_settings
from bus.settings import Settings

GROUP = "fanout"


async def build_fanout(ctx: WorkerContext) -> BatchHandler:
    """The :data:`bus.runtime.worker.HandlerFactory` of the fan-out worker.

    The handler writes on a connection of its own (where the client allows one):
    its round trips then skip redis-py's per-command costs (see
    :mod:`bus.runtime.resp_link`)."""
    link = RespLink.for_client(ctx.redis)
    if link is not None:
        ctx.cleanup.callback(link.close)
    return FanoutHandler(redis=ctx.redis, settings=ctx.settings, link=link)


def worker_settings(settings: Settings | None = None) -> type:
    """arq ``WorkerSettings`` of the fan-out worker (settings from the environment by default)."""
    return consumer_worker_settings(
        worker=GROUP, group=GROUP, build_handler=build_fanout, settings=settings
    )
