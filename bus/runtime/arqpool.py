"""arq's Redis client with every arq key under the bus prefix.

arq builds its job, in-progress, retry and result keys (``arq:job:<id>``, ...)
and its abort set (``arq:abort``) from module constants, outside any prefix;
only the queue name is configurable. :class:`PrefixedArqRedis` is the
``ArqRedis`` that workers (``Worker(redis_pool=...)``) and enqueuers use: it
moves each of those key names under ``{prefix}:`` as the command goes out,
so arq's code runs unchanged and a shared Redis holds nothing of ours outside
the prefix.

Which arguments are keys: every argument of the multi-key commands arq sends
(``DEL``, ``EXISTS``, ``WATCH``, ...), the first argument of every other
command. Only names that start with ``arq:`` change; the queue and the health
check key are already under the prefix (``Keys.arq_queue``).

A worker's pool (``for_worker=True``) also survives a connection that breaks
between arq's ``WATCH`` and its ``EXEC`` (Redis killed at that moment): arq's
poll loop reads a job's in-progress mark and score under ``WATCH`` and does
not catch the ``WatchError`` redis-py raises then, so the worker would exit.
Here the read answers like a job another worker holds: arq skips the job this
round and picks it up on its next poll, once Redis is back.
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from bus.keys import Keys
from bus.settings import Settings

ARQ_KEY_PREFIX = "arq:"
_ALL_ARGS_KEYS = frozenset({"DEL", "EXISTS", "WATCH", "MGET", "UNLINK", "TOUCH"})


def _moved(keys: Keys, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(args) < 2:
        return args
    name = str(args[0]).upper()
    last = len(args) if name in _ALL_ARGS_KEYS else 2
    moved = list(args)
    for i in range(1, last):
        arg = moved[i]
        if isinstance(arg, str) and arg.startswith(ARQ_KEY_PREFIX):
            moved[i] = keys.arq(arg)
    return tuple(moved)


class PrefixedArqRedis(ArqRedis):
    """``ArqRedis`` whose arq keys live under ``prefix``."""

    def __init__(
        self,
        pool_or_conn: ConnectionPool | None = None,
        *,
        prefix: str,
        for_worker: bool = False,
        **kwargs: Any,
    ):
        super().__init__(pool_or_conn, **kwargs)
        self.bus_keys = Keys(prefix)
        self.for_worker = for_worker

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        moved = _moved(self.bus_keys, args)
        return await super().execute_command(*moved, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _PrefixedPipeline(
            self.bus_keys,
            self.for_worker,
            self.connection_pool,
            self.response_callbacks,
            transaction,
            shard_hint,
        )


class _PrefixedPipeline(Pipeline):
    def __init__(self, keys: Keys, for_worker: bool, *args: Any) -> None:
        super().__init__(*args)
        self.bus_keys = keys
        self.for_worker = for_worker

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().immediate_execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except WatchError:
            if not self.for_worker:
                raise
            # The connection broke while watching (the pipeline is reset): a truthy
            # answer reads as "another worker holds this job" in arq's start_jobs.
            return self

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        moved = _moved(self.bus_keys, args)
        return super().execute_command(*moved, **kwargs)


def arq_pool(
    settings: Settings, *, queue: str = "", for_worker: bool = False, **pool_options: Any
) -> PrefixedArqRedis:
    """A :class:`PrefixedArqRedis` for ``settings`` (``queue``: arq's default queue name;
    ``for_worker``: the pool of an arq ``Worker``, see the module's docstring)."""
    pool = ConnectionPool.from_url(settings.redis_url, **pool_options)
    options: dict[str, Any] = {"default_queue_name": queue} if queue else {}
    client = PrefixedArqRedis(pool, prefix=settings.prefix, for_worker=for_worker, **options)
    client.auto_close_connection_pool = True  # the client owns its pool, as from_url's do
    return client
