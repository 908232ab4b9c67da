"""Two trace worker replicas from the arq command line; one SIGKILLed mid-trace."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import msgspec
import redis
import redis.asyncio as aioredis

from bus import events as ev
from bus.keys import ENTRY_FIELD, Keys, partition_of
from bus.producer.callbacks import BusCallbackHandler
from bus.settings import Settings
from bus.traces.queries import get_trace
from bus.traces.tree import Trace
from tests.support.processes import start_worker, stop
from tests.support.runs import assert_same_tree, run_scenario
from tests.support.waiting import wait_until

WORKER = "workers.traces.WorkerSettings"


def owners(client: redis.Redis, settings: Settings) -> list[int | None]:
    keys = Keys(settings.prefix, settings.partitions)
    values = [client.get(keys.lease("traces", p)) for p in range(settings.partitions)]
    return [None if v is None else int(v.decode().split(":")[-2]) for v in values]


def print_diagnostics(client: redis.Redis, settings: Settings, trace_id: str, logs: Path) -> None:
    """What the consumer groups and workers were doing, for a failure report."""
    from bus.runtime.status import collect_status

    async def status() -> object:
        async_client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return (await collect_status(async_client, settings)).to_dict()
        finally:
            await async_client.aclose()

    print("partition of the trace:", partition_of(trace_id, settings.partitions))
    print("status:", asyncio.run(status()))
    print("tree keys:", list(client.scan_iter(match=f"{settings.prefix}:*tree*")))
    for log in sorted(logs.glob("*.log")):
        print(log.name, log.read_text()[-3000:])


def tree_runs(client: redis.Redis, settings: Settings, trace_id: str) -> int:
    summary = client.hget(
        Keys(settings.prefix, settings.partitions).tree(
            trace_id, partition_of(trace_id, settings.partitions)
        ),
        "m",
    )
    return 0 if summary is None else int(msgspec.json.decode(summary)["run_count"])


def completed(client: redis.Redis, settings: Settings, trace_id: str) -> list[ev.TraceCompleted]:
    stream = Keys(settings.prefix, settings.partitions).events(
        partition_of(trace_id, settings.partitions)
    )
    found = [ev.decode(fields[ENTRY_FIELD]) for _, fields in client.xrange(stream)]
    return [e for e in found if isinstance(e, ev.TraceCompleted) and e.trace_id == trace_id]


def test_sigkill_one_replica_mid_trace_gives_the_same_tree(
    settings: Settings, sync_redis: redis.Redis, tmp_path: Path
) -> None:
    settings = settings.replace(partitions=4, lease_ttl_ms=1500, read_block_ms=300)
    # Record the runs' events once (in a side prefix), then feed them in two halves.
    capture = settings.replace(prefix=f"{settings.prefix}:capture")
    handler = BusCallbackHandler(redis=sync_redis, settings=capture)
    expected = [run_scenario(handler) for _ in range(3)]
    assert handler.publisher.flush(5)
    handler.close()
    capture_keys, keys = (
        Keys(capture.prefix, capture.partitions),
        Keys(settings.prefix, settings.partitions),
    )
    trace_ids = [str(run.id) for run in expected]
    # The order the app produced them in: the runs ran one after the other, and
    # seq orders each trace. (Entry ids do not: ids of different streams that
    # share a millisecond are ordered per stream.)
    entries = sorted(
        (_app_order(fields[ENTRY_FIELD], trace_ids), p, fields[ENTRY_FIELD])
        for p in range(settings.partitions)
        for _, fields in sync_redis.xrange(capture_keys.events(p))
    )

    def feed(part: list[tuple[tuple[int, int], int, bytes]]) -> None:
        for _, partition, payload in part:
            sync_redis.xadd(keys.events(partition), {ENTRY_FIELD: payload})

    a = start_worker(settings, tmp_path / "a.log", target=WORKER)
    b = start_worker(settings, tmp_path / "b.log", target=WORKER)
    try:
        wait_until(lambda: {a.pid, b.pid} <= set(owners(sync_redis, settings)), what="both own")
        half = len(entries) // 2
        feed(entries[:half])
        # The second trace is cut in two: kill the replica that holds its partition.
        middle = trace_ids[1]
        try:
            wait_until(lambda: tree_runs(sync_redis, settings, middle) > 0, what="half aggregated")
        except AssertionError:
            print_diagnostics(sync_redis, settings, middle, tmp_path)
            raise
        owner = owners(sync_redis, settings)[partition_of(middle, settings.partitions)]
        victim, survivor = (a, b) if owner == a.pid else (b, a)
        stop(victim, signal.SIGKILL)
        feed(entries[half:])
        wait_until(lambda: owners(sync_redis, settings) == [survivor.pid] * 4, what="takeover")
        wait_until(
            lambda: all(completed(sync_redis, settings, t) for t in trace_ids),
            what="every trace completed",
        )
    finally:
        for process in (a, b):
            stop(process, signal.SIGTERM)
    for run, trace_id in zip(expected, trace_ids, strict=True):
        trace = asyncio.run(_get(settings, trace_id))
        assert trace is not None and trace.root is not None
        assert_same_tree(run, trace.root)
        assert trace.status == "success"
        assert len(completed(sync_redis, settings, trace_id)) == 1


def _app_order(payload: bytes, trace_ids: list[str]) -> tuple[int, int]:
    event = ev.decode(payload)
    return trace_ids.index(event.trace_id), event.seq


async def _get(settings: Settings, trace_id: str) -> Trace | None:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await get_trace(client, settings, trace_id)
    finally:
        await client.aclose()
