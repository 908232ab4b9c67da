"""Where every Redis client of the bus is made: standalone or Redis Cluster.

``LCBUS_REDIS_CLUSTER`` chooses the mode: ``true``, ``false``, or ``auto``
(default), which asks the seed node named by ``LCBUS_REDIS_URL`` whether
``cluster_enabled`` is set in ``INFO cluster``, once per process and URL.

On a cluster the clients are redis-py's ``RedisCluster`` (sync for the
publisher, asyncio for workers and frontends): they follow MOVED and ASK,
refresh the slot map and route each command and each pipelined command to
the master owning its key. They offer the commands of the standalone
clients, so the rest of the bus types them as ``Redis``; the few places that
must tell the modes apart (the publisher's per-node batches, the hub's
per-shard connections, the live-channel publish command) ask
:func:`is_cluster_client`.

A node that fails (a SIGKILLed master without replicas) must cost only the
work on its slots (see also :class:`ContainedCluster`). redis-py's asyncio
cluster client, when a command or a pipeline meets a connection error and
has retries left, closes every connection to every node (``aclose()``)
before retrying: in a process that shares one client between many tasks,
that cuts the blocking reads and pipelines in flight on the healthy masters
too, again at each retry, for as long as the node is down. The bus's clients therefore run with no
client-level retry (``Retry(NoBackoff(), 0)``): the error reaches the loop
that issued the command, which backs off and tries again (the workers'
outage backoff, the frontend's retryable ``unavailable`` and the hub's
reconnects), and redis-py still marks the failed node for a slot-map refresh
on the next command. MOVED, ASK and TRYAGAIN are followed as before: they are
redirections, not retries. And the clients accept a slot map with slots that
no node serves (``require_full_coverage=False``; run the nodes with
``cluster-require-full-coverage no`` too): by default redis-py refuses the
whole map then, and with it every command, not just those of the lost slots.

arq's queue is another matter: arq uses multi-key transactions and does not
run on a cluster, so its keys live on ``LCBUS_QUEUE_REDIS_URL`` (a
standalone Redis; default ``LCBUS_REDIS_URL``). See ``bus.runtime.worker``.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import SlotNotCoveredError

from bus.errors import ConfigError
from bus.settings import Settings

if TYPE_CHECKING:  # arq is not part of the base install (the CLI runs without it)
    from arq.connections import ArqRedis

__all__ = [
    "async_client",
    "is_cluster",
    "is_cluster_client",
    "publish_command",
    "queue_client",
    "queue_url",
    "sync_client",
]

_detected: dict[str, bool] = {}
_detected_lock = threading.Lock()


def is_cluster(settings: Settings) -> bool:
    """Whether ``settings.redis_url`` is a Redis Cluster (asks the seed when ``auto``)."""
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "true"
    url = settings.redis_url
    with _detected_lock:
        if url not in _detected:
            _detected[url] = _ask_seed(url)
        return _detected[url]


def _ask_seed(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        info: Any = client.info("cluster")
    except redis.RedisError as exc:
        raise ConfigError(
            f"LCBUS_REDIS_CLUSTER=auto could not ask {url} whether it is a cluster ({exc}); "
            "set LCBUS_REDIS_CLUSTER=true or false"
        ) from exc
    finally:
        client.close()
    return bool(int(info.get("cluster_enabled", 0)))


def sync_client(settings: Settings, **options: Any) -> redis.Redis:
    """A blocking client for ``settings.redis_url`` (the publisher's)."""
    if is_cluster(settings):
        # Same commands as redis.Redis; callers that care ask is_cluster_client().
        options.setdefault("require_full_coverage", False)  # see the module docstring
        return cast(redis.Redis, RedisCluster.from_url(settings.redis_url, **options))
    return redis.Redis.from_url(settings.redis_url, **options)


def async_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio client for ``settings.redis_url`` (workers, frontends, CLI)."""
    if is_cluster(settings):
        options.pop("health_check_interval", None)  # per-node connections check themselves
        options.setdefault("retry", Retry(NoBackoff(), 0))  # see the module docstring
        options.setdefault("require_full_coverage", False)
        return cast(aioredis.Redis, ContainedCluster.from_url(settings.redis_url, **options))
    return aioredis.Redis.from_url(settings.redis_url, **options)


_in_command: ContextVar[bool] = ContextVar("lcbus_cluster_in_command", default=False)


class ContainedCluster(AsyncRedisCluster):
    """redis-py's asyncio cluster client, without one reaction to a lost node.

    On a ``CLUSTERDOWN`` reply (a slot no node serves, a master rejoining) and
    now and then on ``MOVED``, redis-py closes every connection to every node
    (``aclose()``) to rebuild its slot map. In a client that many tasks share,
    that cuts the commands in flight on the healthy masters too (their reads
    fail with "Connection closed by server", or find their connection's writer
    gone mid-send), again at each such reply for as long as the node is lost.
    Inside a command, the close is replaced by what it is for: the slot map is
    refreshed before the next command, and connections are recycled lazily as
    redis-py's refresh does. Closing the client (``aclose()`` from outside a
    command) still closes everything.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py 8.1 looks the key's slot up in its map without catching a slot
        # the map lacks (no node served it at the last refresh), and nothing
        # refreshes the map then: the slot would stay unreachable once served
        # again. Refresh and try once more; still unserved is SlotNotCoveredError.
        for refreshed in (False, True):
            try:
                return await super().execute_command(*args, **kwargs)
            except KeyError as exc:
                if not (exc.args and isinstance(exc.args[0], int)):
                    raise
                if refreshed:
                    raise SlotNotCoveredError(f"no node serves slot {exc.args[0]}") from None
                self._initialize = True
                await self.initialize()
        raise AssertionError("unreachable")

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        token = _in_command.set(True)
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        finally:
            _in_command.reset(token)

    async def aclose(self) -> None:
        if _in_command.get():
            self._initialize = True
            return
        await super().aclose()


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` (sync or asyncio) talks to a Redis Cluster."""
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def publish_command(client: object) -> str:
    """The live-channel publish command for ``client``'s Redis.

    Sharded pub/sub on a cluster: ``SPUBLISH`` reaches only the shard owning
    the channel's slot, where classic ``PUBLISH`` is copied to every node.
    Classic ``PUBLISH`` on a standalone Redis: it works on every server the
    bus supports there (Redis 6, fakeredis of the embedded demo, managed
    services), and with one node sharding buys nothing.
    """
    return "SPUBLISH" if is_cluster_client(client) else "PUBLISH"


def queue_url(settings: Settings) -> str:
    """Where arq's queue, job and health keys live: ``LCBUS_QUEUE_REDIS_URL``, else the
    data plane's Redis, which must then be standalone."""
    if settings.queue_redis_url:
        return settings.queue_redis_url
    if is_cluster(settings):
        raise ConfigError(
            f"{settings.redis_url} is a Redis Cluster, where arq cannot run (it uses "
            "multi-key transactions): set LCBUS_QUEUE_REDIS_URL to a standalone Redis"
        )
    return settings.redis_url


def queue_client(settings: Settings, *, share: aioredis.Redis | None = None) -> ArqRedis:
    """An arq client for enqueueing attempts. It shares ``share``'s connection pool
    when the queue lives on that (standalone) Redis; otherwise the caller owns it and
    closes it with ``aclose()``."""
    from arq.connections import ArqRedis

    url = queue_url(settings)
    if share is not None and not is_cluster_client(share) and url == settings.redis_url:
        return ArqRedis(connection_pool=share.connection_pool)
    return cast(ArqRedis, ArqRedis.from_url(url))  # from_url builds the class it is called on
