"""Prometheus metrics of a consumer, served on a worker's HTTP port.

Counters come straight from :class:`~bus.runtime.consumer.ConsumerStats` at scrape
time. Lag and pending need Redis, and a scrape runs in the exporter's thread,
so an async task refreshes them from :func:`bus.runtime.status.collect_status` and
the collector serves the last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bus.runtime.consumer import GroupConsumer
from bus.runtime.outage import TRANSIENT_ERRORS, Outage
from bus.runtime.status import GroupStatus, collect_status
from bus.settings import Settings

log = logging.getLogger(__name__)

REFRESH_S = 5.0

_COUNTERS = {
    "processed": "Events the handler processed successfully",
    "failed": "Handler calls that raised (each retry counts)",
    "dead_lettered": "Entries moved to the dead-letter stream",
    "unknown_skipped": "Entries of an event type this version does not know, skipped",
    "undecodable": "Entries that were not bus events",
    "redis_errors": "Redis errors the consumer rode out",
    "leases_lost": "Partition leases lost to expiry or another replica",
}


class ConsumerCollector:
    """A prometheus-client collector over one consumer and its last group status."""

    def __init__(self, consumer: GroupConsumer) -> None:
        self._consumer = consumer
        self.status: GroupStatus | None = None

    def collect(self) -> Iterator[Any]:
        group = self._consumer.group
        stats = self._consumer.stats.as_dict()
        for name, doc in _COUNTERS.items():
            counter = CounterMetricFamily(f"lcbus_consumer_{name}", doc, labels=["group"])
            counter.add_metric([group], stats[name])
            yield counter
        owned = GaugeMetricFamily(
            "lcbus_consumer_owned_partitions", "Partitions leased here", labels=["group"]
        )
        owned.add_metric([group], len(self._consumer.owned_partitions))
        yield owned
        if self.status is None:
            return
        lag = GaugeMetricFamily(
            "lcbus_group_lag", "Entries not yet delivered", labels=["group", "partition"]
        )
        pending = GaugeMetricFamily(
            "lcbus_group_pending", "Entries delivered, not acked", labels=["group", "partition"]
        )
        for p in self.status.partitions:
            lag.add_metric([group, str(p.partition)], p.lag)
            pending.add_metric([group, str(p.partition)], p.pending)
        dlq = GaugeMetricFamily("lcbus_group_dead_letters", "Dead-letter length", labels=["group"])
        dlq.add_metric([group], self.status.dead_letters)
        yield from (lag, pending, dlq)


class MetricsExporter:
    """Serves a consumer's metrics on ``port`` and keeps the Redis-side gauges fresh."""

    def __init__(
        self, *, consumer: GroupConsumer, redis: aioredis.Redis, settings: Settings, port: int
    ) -> None:
        self.registry = CollectorRegistry()
        self.collector = ConsumerCollector(consumer)
        self.registry.register(self.collector)
        self._consumer = consumer
        self._redis = redis
        self._settings = settings
        self._port = port
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.refresh()
        self._server, _thread = start_http_server(self._port, registry=self.registry)
        self._task = asyncio.create_task(self._refresh_loop(), name="lcbus-metrics")

    async def refresh(self) -> None:
        status = await collect_status(self._redis, self._settings, groups=[self._consumer.group])
        self.collector.status = status.groups[0]

    async def _refresh_loop(self) -> None:
        outage = Outage("metrics refresh")
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
                outage.recovered()
            except TRANSIENT_ERRORS as exc:
                await asyncio.sleep(outage.failed(exc))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            # shutdown() waits for the serving thread's poll loop to notice.
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
            self._server = None
