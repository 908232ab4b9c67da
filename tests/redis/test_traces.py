"""Run trees from the bus equal langchain-core's own trace, whatever the delivery order."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from bus import events as ev
from bus.keys import Keys, partition_of
from bus.producer.callbacks import BusCallbackHandler
from bus.runtime.consumer import Delivery
from bus.settings import Settings
from bus.traces.aggregator import TraceAggregator
from bus.traces.queries import get_trace, list_traces
from bus.traces.store import TraceStore
from bus.traces.tree import Trace, apply
from tests.support.published import bus_deliveries
from tests.support.runs import arun_scenario, assert_same_tree, count_runs, run_scenario


def completed_events(client: redis.Redis, settings: Settings) -> list[ev.TraceCompleted]:
    return [
        d.event for d in bus_deliveries(client, settings) if isinstance(d.event, ev.TraceCompleted)
    ]


def comparable(trace: Trace) -> dict[str, object]:
    """A trace without the worker's own clock readings."""
    data = msgspec.to_builtins(trace)
    data.pop("updated_at")
    return data


@pytest.fixture
def handler(settings: Settings, sync_redis: redis.Redis) -> BusCallbackHandler:
    bus_handler = BusCallbackHandler(redis=sync_redis, settings=settings)
    yield bus_handler
    bus_handler.close()


async def aggregate(
    async_redis: aioredis.Redis, settings: Settings, batches: list[list[Delivery]]
) -> TraceAggregator:
    aggregator = TraceAggregator(redis=async_redis, settings=settings)
    for batch in batches:
        await aggregator(batch)
    return aggregator


@pytest.mark.parametrize("fail", [False, True], ids=["root-ok", "root-fails"])
async def test_sync_runs_give_the_tracer_tree(
    fail: bool,
    handler: BusCallbackHandler,
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
) -> None:
    expected = await asyncio.to_thread(run_scenario, handler, fail=fail)
    assert handler.publisher.flush(5)
    deliveries = bus_deliveries(sync_redis, settings)
    batches = [deliveries[i : i + 7] for i in range(0, len(deliveries), 7)]
    await aggregate(async_redis, settings, batches)

    trace = await get_trace(async_redis, settings, str(expected.id))
    assert trace is not None and trace.root is not None
    assert trace.orphans == []
    assert_same_tree(expected, trace.root)
    assert trace.run_count == count_runs(expected)
    assert trace.status == ("error" if fail else "success")
    assert trace.completed and trace.open_runs == 0
    assert trace.errors == (2 if fail else 1)
    assert trace.model_calls == 1
    assert trace.root.children[0].children[1].token_count == 5  # prompt | model | parser
    [done] = completed_events(sync_redis, settings)
    assert (done.trace_id, done.status) == (trace.trace_id, trace.status)
    assert done.rollup["run_count"] == trace.run_count


async def test_async_runs_give_the_tracer_tree(
    handler: BusCallbackHandler,
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
) -> None:
    expected = await arun_scenario(handler)
    assert handler.publisher.flush(5)
    await aggregate(async_redis, settings, [bus_deliveries(sync_redis, settings)])

    trace = await get_trace(async_redis, settings, str(expected.id))
    assert trace is not None and trace.root is not None
    assert_same_tree(expected, trace.root)
    assert trace.status == "success"


async def test_shuffled_duplicated_and_redelivered_events_give_the_same_tree(
    handler: BusCallbackHandler,
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
) -> None:
    expected = await asyncio.to_thread(run_scenario, handler)
    assert handler.publisher.flush(5)
    deliveries = bus_deliveries(sync_redis, settings)
    in_order = await aggregate(async_redis, settings, [deliveries])
    reference = await get_trace(async_redis, settings, str(expected.id))
    assert reference is not None

    rng = random.Random(7)
    for round_ in range(3):
        other = settings.replace(prefix=f"{settings.prefix}:shuffle{round_}")
        mixed = deliveries + rng.sample(deliveries, len(deliveries) // 2)
        rng.shuffle(mixed)
        cuts = sorted(rng.sample(range(1, len(mixed)), 5))
        batches = [mixed[a:b] for a, b in zip([0, *cuts], [*cuts, len(mixed)], strict=True)]
        # A second replica handles some batches, and one batch is delivered twice.
        first = TraceAggregator(redis=async_redis, settings=other)
        second = TraceAggregator(redis=async_redis, settings=other)
        for index, batch in enumerate([*batches, batches[2]]):
            await (first if index % 2 else second)(batch)
        trace = await get_trace(async_redis, other, str(expected.id))
        assert trace is not None
        assert comparable(trace) == comparable(reference)
        done = completed_events(sync_redis, other)
        assert len(done) == 1, f"trace.completed published {len(done)} times"
    assert in_order.published == 1


async def test_trace_expires_with_its_index_entry(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    short = settings.replace(trace_ttl_s=1)
    aggregator = TraceAggregator(redis=async_redis, settings=short)
    await aggregator.apply({"t-old": [_start("t-old", "t-old", seq=1)]})
    page = await list_traces(async_redis, short)
    assert [s.trace_id for s in page.traces] == ["t-old"]
    assert await get_trace(async_redis, short, "t-old") is not None

    # Redis expires the key 1 s after the write; 2.2 s leaves room for a slow scheduler.
    await asyncio.sleep(2.2)
    assert await get_trace(async_redis, short, "t-old") is None
    assert (await list_traces(async_redis, short)).traces == []
    keys = Keys(short.prefix, short.partitions)
    assert sync_redis.zcard(keys.trace_index(partition_of("t-old", short.partitions))) == 0


def _start(trace_id: str, run_id: str, *, seq: int, parent: str | None = None) -> ev.ChainStart:
    return ev.ChainStart(
        id=f"{run_id}-s",
        time=time.time(),
        run_id=run_id,
        trace_id=trace_id,
        parent_run_id=parent,
        seq=seq,
        name="chain",
        run_type="chain",
        source="proc-a",
    )


async def test_idle_trace_completes_by_timeout_once(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    cfg = settings.replace(trace_complete_timeout_s=30.0)
    aggregator = TraceAggregator(redis=async_redis, settings=cfg)
    await aggregator.apply({"idle": [_start("idle", "idle", seq=1)]})
    await aggregator.apply({"busy": [_start("busy", "busy", seq=1)]})
    assert await aggregator.sweep() == 0  # nothing idle for 30 s yet

    later = time.time() + 31
    replica = TraceAggregator(redis=async_redis, settings=cfg)
    assert await replica.sweep(now=later) == 2
    assert await aggregator.sweep(now=later) == 0
    trace = await get_trace(async_redis, cfg, "idle")
    assert trace is not None and (trace.status, trace.completed) == ("timeout", True)
    assert sorted(e.trace_id for e in completed_events(sync_redis, cfg)) == ["busy", "idle"]
    assert {e.status for e in completed_events(sync_redis, cfg)} == {"timeout"}
    stream = Keys(cfg.prefix, cfg.partitions).events(partition_of("idle", cfg.partitions))
    assert sync_redis.xlen(stream) >= 1


class CountingConnection(aioredis.Connection):
    """Counts the bytes each connection sends to Redis (commands and their arguments)."""

    sent = 0

    async def send_packed_command(self, command: object, check_health: bool = True) -> None:
        if isinstance(command, bytes | str):
            CountingConnection.sent += len(command)
        else:
            CountingConnection.sent += sum(len(part) for part in command)  # type: ignore[attr-defined]
        await super().send_packed_command(command, check_health)  # type: ignore[arg-type]


async def test_a_trace_of_many_large_tool_runs_writes_each_run_about_once(
    settings: Settings,
) -> None:
    """1,000 tool runs of 20 KB in one trace, arriving a few runs per batch as from a
    live agent: the trace worker writes what changed, not the whole tree per batch."""
    trace, runs, size = "big-trace", 1000, 20_000
    common = {"trace_id": trace, "source": "app", "time": time.time()}
    events: list[ev.BaseEvent] = [
        ev.ChainStart(id="root-s", run_id=trace, seq=1, name="agent", run_type="chain", **common)
    ]
    for n in range(runs):
        run_id, output = f"tool-{n}", f"{n:05d}" + "x" * (size - 5)
        tool = {"run_id": run_id, "parent_run_id": trace, "name": "fetch", **common}
        events.append(ev.ToolStart(id=f"s{n}", seq=2 + 2 * n, input_str=str(n), **tool))
        events.append(ev.ToolEnd(id=f"e{n}", seq=3 + 2 * n, output=output, **tool))
    events.append(ev.ChainEnd(id="root-e", run_id=trace, seq=2 + 2 * runs, **common))
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    CountingConnection.sent = 0
    try:
        aggregator = TraceAggregator(redis=client, settings=settings)
        for start in range(0, len(events), 10):  # five tool runs per batch
            batch = [Delivery(f"1-{i}", 0, e) for i, e in enumerate(events[start : start + 10])]
            await aggregator(batch)
        written = CountingConnection.sent
        stored = await get_trace(client, settings, trace)
    finally:
        await client.aclose()
        await pool.aclose()
    assert stored is not None and stored.status == "success" and stored.root is not None
    outputs = [child.outputs for child in stored.root.children]
    assert outputs == [{"output": f"{n:05d}" + "x" * (size - 5)} for n in range(runs)]
    # The runs' own bytes, and a little per batch: 20 MB, where rewriting the whole
    # tree per batch would send about 2 GB.
    assert runs * size < written < 1.2 * runs * size


async def test_one_save_call_writes_the_traces_whose_version_held(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    """Every trace of a partition's batch goes in one script call: the trace that lost
    the compare-and-set is left alone and reported, and the traces after it are
    written in full (its run values are skipped, not read as theirs)."""
    ids = [t for t in (f"cas-{n}" for n in range(100)) if partition_of(t, settings.partitions) == 0]
    first, raced, last = ids[:3]
    common = {"source": "app", "time": 1000.0, "run_type": "chain", "name": "chain"}

    def start(trace: str, run: str, seq: int) -> ev.ChainStart:
        parent = None if run == trace else trace
        return ev.ChainStart(
            id=f"{run}-s", run_id=run, trace_id=trace, parent_run_id=parent, seq=seq, **common
        )

    ours = TraceStore(redis=async_redis, settings=settings)
    theirs = TraceStore(redis=async_redis, settings=settings)
    loaded = await ours.load([first, raced, last])
    for trace, item in loaded.items():
        apply(item.state, start(trace, trace, 1))
        item.touched(trace)
    assert (await ours.save(loaded, now=1000.0)).conflicts == []
    # Another writer (a replica that took the partition over) moves one trace on.
    moved = await theirs.load([raced], fresh=True)
    apply(moved[raced].state, start(raced, f"{raced}-theirs", 2))
    moved[raced].touched(f"{raced}-theirs")
    assert (await theirs.save(moved, now=1001.0)).conflicts == []

    again = await ours.load([first, raced, last])  # from the cache: raced is stale
    for trace, item in again.items():
        apply(item.state, start(trace, f"{trace}-child", 3))
        item.touched(f"{trace}-child")
    saved = await ours.save(again, now=1002.0)
    assert saved.conflicts == [raced]
    for trace in (first, last):
        stored = await get_trace(async_redis, settings, trace)
        assert stored is not None and stored.root is not None
        assert [child.id for child in stored.root.children] == [f"{trace}-child"]
    stored = await get_trace(async_redis, settings, raced)
    assert stored is not None and stored.root is not None
    assert [child.id for child in stored.root.children] == [f"{raced}-theirs"]


async def test_a_save_of_more_runs_than_one_hset_takes(
    settings: Settings, async_redis: aioredis.Redis
) -> None:
    """The script writes a trace's fields in chunks of HSETs: a batch that changed
    5,000 runs (a legacy tree's first save rewrites every run) stores all of them."""
    trace, runs = "wide-trace", 5000
    common = {"trace_id": trace, "source": "app", "time": 1000.0, "run_type": "tool"}
    store = TraceStore(redis=async_redis, settings=settings)
    loaded = await store.load([trace])
    for n in range(runs + 1):
        run = trace if n == 0 else f"tool-{n}"
        parent = None if n == 0 else trace
        event = ev.ToolStart(id=f"s{n}", run_id=run, parent_run_id=parent, seq=n, **common)
        apply(loaded[trace].state, event)
        loaded[trace].touched(run)
    assert (await store.save(loaded, now=1000.0)).conflicts == []
    stored = await get_trace(async_redis, settings, trace)
    assert stored is not None and stored.root is not None
    assert len(stored.root.children) == runs
