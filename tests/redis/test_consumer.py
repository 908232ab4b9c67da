"""GroupConsumer in-process against real Redis: delivery, order, dead letters, leases."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import pytest
import redis
import redis.asyncio as aioredis

from bus.connect import async_client
from bus.events import encode
from bus.keys import ENTRY_FIELD, Keys, partition_of
from bus.runtime import deadletter
from bus.runtime.consumer import Delivery, GroupConsumer
from bus.settings import Settings
from tests.support.publishing import make_event, publish, publish_raw, traces_events
from tests.support.waiting import wait_until_async

GROUP = "g"


class Recorder:
    """A handler that records what it saw and can fail on chosen events."""

    def __init__(self, *, fail_ids: Sequence[str] = (), delay: float = 0.0) -> None:
        self.seen: list[Delivery] = []
        self.calls = 0
        self.fail_ids = set(fail_ids)
        self.delay = delay

    async def __call__(self, batch: Sequence[Delivery]) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if any(d.event.id in self.fail_ids for d in batch):
            raise ValueError("refusing " + ",".join(d.event.id for d in batch))
        self.seen.extend(batch)


def fast(settings: Settings, **changes: object) -> Settings:
    return settings.replace(
        lease_ttl_ms=1500, read_block_ms=200, retry_backoff_ms=1, read_count=50, **changes
    )


async def pending(client: aioredis.Redis, settings: Settings) -> int:
    keys = Keys(settings.prefix, settings.partitions)
    total = 0
    for p in range(settings.partitions):
        total += (await client.xpending(keys.events(p), GROUP))["pending"]
    return total


async def no_pending(client: aioredis.Redis, settings: Settings) -> bool:
    return await pending(client, settings) == 0


async def test_delivers_every_event_once_in_trace_order_and_acks(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings)
    # Published before the group exists: group start id 0 must still see them.
    events = traces_events(10, 60)
    publish(sync_redis, settings, events)
    recorder = Recorder()
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=recorder
    ) as consumer:
        await wait_until_async(lambda: len(recorder.seen) >= len(events))
        assert consumer.owned_partitions == frozenset(range(settings.partitions))
        await wait_until_async(lambda: no_pending(async_redis, settings))
    assert sorted(d.event.id for d in recorder.seen) == sorted(e.id for e in events)
    for delivery in recorder.seen:
        assert delivery.partition == partition_of(delivery.event.trace_id, settings.partitions)
    by_trace: dict[str, list[int]] = {}
    for delivery in recorder.seen:
        by_trace.setdefault(delivery.event.trace_id, []).append(delivery.event.seq)
    assert all(seqs == sorted(seqs) for seqs in by_trace.values())
    assert await pending(async_redis, settings) == 0
    assert consumer.stats.processed == len(events)
    # aclose released every lease and left the group.
    keys = Keys(settings.prefix, settings.partitions)
    for p in range(settings.partitions):
        assert sync_redis.get(keys.lease(GROUP, p)) is None
    assert sync_redis.zcard(keys.members(GROUP)) == 0


async def test_poison_and_failing_entries_go_to_dead_letters_and_replay(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, max_attempts=2)
    bad = make_event("tx", 5)
    events = [make_event("tx", s) for s in range(5)] + [bad]
    events += [make_event("tx", s) for s in range(6, 12)]
    publish(sync_redis, settings, events)
    poison_partition = partition_of("tx", settings.partitions)
    poison_id = publish_raw(sync_redis, settings, poison_partition, b"\xc1 not msgpack")
    unknown = msgspec.msgpack.encode({"type": "from_the_future", "id": "u1", "trace_id": "tx"})
    publish_raw(sync_redis, settings, poison_partition, unknown)
    publish(sync_redis, settings, [make_event("tx", 12)])

    recorder = Recorder(fail_ids=[bad.id])
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=recorder
    ) as consumer:
        await wait_until_async(lambda: any(d.event.seq == 12 for d in recorder.seen))
        letters = await deadletter.list_dead_letters(async_redis, settings, GROUP)
        assert [letter.reason for letter in letters] == [
            deadletter.REASON_HANDLER_FAILED,
            deadletter.REASON_UNDECODABLE,
        ]
        failed, poison = letters
        assert failed.error.startswith("ValueError: refusing tx-5")
        assert failed.partition == poison_partition
        assert poison.entry_id == poison_id
        assert poison.payload == b"\xc1 not msgpack"
        # The rest flowed on, in order, around the failing one.
        assert [d.event.seq for d in recorder.seen] == [*range(5), *range(6, 13)]
        assert consumer.stats.unknown_skipped == 1
        assert consumer.stats.dead_lettered == 2
        assert await pending(async_redis, settings) == 0

        recorder.fail_ids.clear()
        assert await deadletter.replay(async_redis, settings, GROUP, [failed.id]) == [failed.id]
        await wait_until_async(lambda: recorder.seen[-1].event.id == bad.id)
        assert await deadletter.dead_letter_count(async_redis, settings, GROUP) == 1


async def test_replicas_split_partitions_and_rebalance_when_one_leaves(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=6)
    first, second = Recorder(), Recorder()
    a = GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=first, replica_id="a"
    )
    b = GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=second, replica_id="b"
    )
    await a.start()
    await wait_until_async(lambda: a.owned_partitions == frozenset(range(6)))
    await b.start()
    await wait_until_async(
        lambda: a.owned_partitions == {0, 2, 4} and b.owned_partitions == {1, 3, 5}
    )
    keys = Keys(settings.prefix, settings.partitions)
    assert sync_redis.get(keys.lease(GROUP, 1)) == b"b"

    events = traces_events(12, 20)
    publish(sync_redis, settings, events)
    await wait_until_async(lambda: len(first.seen) + len(second.seen) == len(events))
    assert {d.partition for d in second.seen} <= {1, 3, 5}

    # Leaving releases at once: a takes over long before b's leases could expire.
    await b.aclose()
    await wait_until_async(lambda: a.owned_partitions == frozenset(range(6)), within=1.4)
    await a.aclose()


async def test_a_lost_lease_stops_the_partition_at_once(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=2)
    recorder = Recorder()
    keys = Keys(settings.prefix, settings.partitions)
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=recorder, replica_id="me"
    ) as consumer:
        await wait_until_async(lambda: consumer.owned_partitions == {0, 1})
        # Another process "steals" partition 0 (as after an expiry we slept through).
        sync_redis.set(keys.lease(GROUP, 0), "thief", px=60_000)
        await wait_until_async(lambda: consumer.owned_partitions == {1})
        assert consumer.stats.leases_lost == 1
        trace0 = next(f"x{i}" for i in range(100) if partition_of(f"x{i}", 2) == 0)
        trace1 = next(f"x{i}" for i in range(100) if partition_of(f"x{i}", 2) == 1)
        publish(sync_redis, settings, [make_event(trace0, 0), make_event(trace1, 0)])
        await wait_until_async(lambda: any(d.event.trace_id == trace1 for d in recorder.seen))
        await asyncio.sleep(settings.heartbeat_interval_s * 2)
        assert all(d.partition == 1 for d in recorder.seen)
        assert sync_redis.get(keys.lease(GROUP, 0)) == b"thief"


async def test_aclose_finishes_and_acks_the_batch_in_hand(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=1)
    recorder = Recorder(delay=0.5)
    consumer = GroupConsumer(redis=async_redis, settings=settings, group=GROUP, handler=recorder)
    await consumer.start()
    publish(sync_redis, settings, traces_events(3, 5))
    await wait_until_async(lambda: recorder.calls >= 1)
    await consumer.aclose()
    assert len(recorder.seen) == 15
    assert await pending(async_redis, settings) == 0
    assert sync_redis.get(Keys(settings.prefix, settings.partitions).lease(GROUP, 0)) is None


async def test_handler_redis_errors_are_an_outage_not_poison(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=1, max_attempts=1)
    outage = {"left": 3}
    seen: list[Delivery] = []

    async def flaky(batch: Sequence[Delivery]) -> None:
        if outage["left"]:
            outage["left"] -= 1
            raise redis.ConnectionError("connection reset")
        seen.extend(batch)

    publish(sync_redis, settings, traces_events(2, 10))
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=flaky
    ) as consumer:
        await wait_until_async(lambda: len(seen) == 20)
        assert consumer.stats.redis_errors == 3
    assert await deadletter.dead_letter_count(async_redis, settings, GROUP) == 0
    assert await pending(async_redis, settings) == 0


async def test_entries_parked_by_a_late_read_are_picked_up(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    """A stalled former holder's read, served after the takeover, parks entries
    in the partition's pending list; the holder finds and handles them."""
    settings = fast(settings, partitions=1)
    recorder = Recorder()
    consumer = GroupConsumer(redis=async_redis, settings=settings, group=GROUP, handler=recorder)
    await consumer.start()
    try:
        await wait_until_async(lambda: consumer.owned_partitions == {0})
        await asyncio.sleep(0.3)  # the holder is past its pending re-read, reading new entries
        stream = Keys(settings.prefix, settings.partitions).events(0)
        # The stale read: another process reads as the partition's consumer name.
        # In one transaction, so that the holder's own blocking read cannot win.
        parked = make_event("t-parked", 1)
        with sync_redis.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {ENTRY_FIELD: encode(parked)})
            pipe.xreadgroup(GROUP, "p0", {stream: ">"}, count=10)
            pipe.execute()
        await wait_until_async(
            lambda: [d.event.id for d in recorder.seen] == [parked.id], within=10
        )
        await wait_until_async(lambda: no_pending(async_redis, settings))
    finally:
        await consumer.aclose()


async def test_entries_parked_before_newer_ones_are_handled_first(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    """A read whose reply was lost (Redis stalled past the socket timeout) is served
    after the holder's next read: it parks a trace's earlier entries while later ones
    arrive. The holder notices on its very next read and handles them in stream
    order, instead of the later ones first."""
    # A long lease: the idle reader's own look at its pending list comes too late.
    settings = settings.replace(partitions=1, lease_ttl_ms=60_000, read_block_ms=200, read_count=50)
    recorder = Recorder()
    consumer = GroupConsumer(redis=async_redis, settings=settings, group=GROUP, handler=recorder)
    await consumer.start()
    try:
        await wait_until_async(lambda: consumer.owned_partitions == {0})
        await asyncio.sleep(0.3)  # the holder is past its pending re-read, reading new entries
        stream = Keys(settings.prefix, settings.partitions).events(0)
        early = [make_event("t-order", seq) for seq in range(1, 4)]
        late = [make_event("t-order", seq) for seq in range(4, 7)]
        with sync_redis.pipeline(transaction=True) as pipe:
            for event in early:
                pipe.xadd(stream, {ENTRY_FIELD: encode(event)})
            pipe.xreadgroup(GROUP, "p0", {stream: ">"}, count=10)  # the lost read
            for event in late:
                pipe.xadd(stream, {ENTRY_FIELD: encode(event)})
            pipe.execute()
        await wait_until_async(lambda: len(recorder.seen) >= 3, within=10)
        assert [d.event.seq for d in recorder.seen[:3]] == [1, 2, 3]
        await wait_until_async(lambda: len(recorder.seen) >= 6, within=10)
        assert [d.event.seq for d in recorder.seen] == [1, 2, 3, 4, 5, 6]
        await wait_until_async(lambda: no_pending(async_redis, settings))
    finally:
        await consumer.aclose()


async def test_entries_parked_while_a_batch_is_handled_are_found_by_the_read_ahead(
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A busy partition's next batch is read while the one before is handled, and
    that batch is still pending then: the read ahead tells it apart from entries a
    late read parked. It finds the parked ones (once, and only them) and they are
    handled before the newer entries that arrived after them."""
    settings = settings.replace(partitions=1, lease_ttl_ms=60_000, read_block_ms=200, read_count=4)
    stream = Keys(settings.prefix, settings.partitions).events(0)
    gate = asyncio.Event()
    seen: list[int] = []

    async def handler(batch: Sequence[Delivery]) -> None:
        if not seen:
            await gate.wait()  # the first batch is handled until the entries are parked
        seen.extend(d.event.seq for d in batch)

    caplog.set_level("WARNING", logger="bus.runtime.reader")
    consumer = GroupConsumer(redis=async_redis, settings=settings, group=GROUP, handler=handler)
    await consumer.start()
    try:
        await wait_until_async(lambda: consumer.owned_partitions == {0})
        await asyncio.sleep(0.3)  # the holder is past its pending re-read, reading new entries
        # Two batches: the holder handles the first, the second is read ahead meanwhile.
        with sync_redis.pipeline(transaction=True) as pipe:
            for seq in range(1, 9):
                pipe.xadd(stream, {ENTRY_FIELD: encode(make_event("t", seq))})
            pipe.execute()
        await wait_until_async(
            lambda: sync_redis.xpending(stream, GROUP)["pending"] == 8  # type: ignore[index]
        )
        with sync_redis.pipeline(transaction=True) as pipe:
            for seq in range(9, 12):
                pipe.xadd(stream, {ENTRY_FIELD: encode(make_event("t", seq))})
            pipe.xreadgroup(GROUP, "p0", {stream: ">"}, count=10)  # the late read
            for seq in range(12, 15):
                pipe.xadd(stream, {ENTRY_FIELD: encode(make_event("t", seq))})
            pipe.execute()
        assert not [r for r in caplog.records if "parked" in r.message]  # none before
        gate.set()
        await wait_until_async(lambda: len(seen) >= 14, within=10)
        await wait_until_async(lambda: no_pending(async_redis, settings))
        assert seen == list(range(1, 15))
        assert [r.message for r in caplog.records if "parked" in r.message] == [
            "re-reading parked entries of g partition 0"
        ]
    finally:
        gate.set()
        await consumer.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_entries_of_any_field_layout_and_deleted_ones_in_either_protocol(
    settings: Settings, sync_redis: redis.Redis, protocol: int
) -> None:
    """The reader takes XREADGROUP replies as Redis sends them (RESP2 or RESP3, no
    per-entry dict): the event field is found wherever it is among the fields, an
    entry without it is dead-lettered as undecodable, and a pending entry deleted
    from the stream before it was handled is counted and acknowledged."""
    settings = fast(settings, partitions=1)
    stream = Keys(settings.prefix, settings.partitions).events(0)
    first, second, third = (make_event("t-fields", seq) for seq in (1, 2, 3))
    sync_redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    deleted = sync_redis.xadd(stream, {ENTRY_FIELD: encode(make_event("t-fields", 0))})
    sync_redis.xreadgroup(GROUP, "p0", {stream: ">"}, count=1)  # pending under p0 ...
    sync_redis.xdel(stream, deleted)  # ... and gone from the stream
    sync_redis.xadd(stream, {ENTRY_FIELD: encode(first)})
    sync_redis.xadd(stream, {b"note": b"before the event", ENTRY_FIELD: encode(second)})
    no_event = sync_redis.xadd(stream, {b"note": b"no event at all"})
    sync_redis.xadd(stream, {ENTRY_FIELD: encode(third), b"note": b"after the event"})
    client = async_client(settings, protocol=protocol)
    recorder = Recorder()
    try:
        async with GroupConsumer(
            redis=client, settings=settings, group=GROUP, handler=recorder
        ) as consumer:
            await wait_until_async(lambda: len(recorder.seen) >= 3)
            await wait_until_async(lambda: no_pending(client, settings))
            letters = await deadletter.list_dead_letters(client, settings, GROUP)
    finally:
        await client.aclose()
    assert [d.event for d in recorder.seen] == [first, second, third]
    assert [(letter.reason, letter.entry_id, letter.payload) for letter in letters] == [
        (deadletter.REASON_UNDECODABLE, no_event.decode(), b"")
    ]
    assert (consumer.stats.trimmed, consumer.stats.undecodable) == (1, 1)


class NodeDown:
    """A handler whose work for some traces fails as when the node their keys live
    on is down (a connection error), while the others go through."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.seen: list[Delivery] = []

    async def __call__(self, batch: Sequence[Delivery]) -> None:
        if any(d.event.trace_id in self.down for d in batch):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:7002")
        self.seen.extend(batch)

    def seqs(self, trace: str) -> list[int]:
        return [d.event.seq for d in self.seen if d.event.trace_id == trace]


async def test_a_trace_whose_node_is_down_is_held_while_the_partition_flows_on(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=1, max_attempts=1)
    handler = NodeDown({"t0"})
    publish(sync_redis, settings, traces_events(3, 10))
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=handler
    ) as consumer:
        await wait_until_async(lambda: len(handler.seen) == 20)
        assert handler.seqs("t0") == []
        # Held, not acknowledged; what arrives for it meanwhile waits behind it.
        publish(sync_redis, settings, [make_event("t0", s) for s in range(10, 15)])
        publish(sync_redis, settings, [make_event("t1", s) for s in range(10, 15)])
        await wait_until_async(lambda: handler.seqs("t1") == list(range(15)))
        assert handler.seqs("t0") == []
        assert await pending(async_redis, settings) == 15
        assert consumer.stats.redis_errors >= 2
        handler.down.clear()  # the node is back
        await wait_until_async(lambda: handler.seqs("t0") == list(range(15)))
        await wait_until_async(lambda: no_pending(async_redis, settings))
    assert handler.seqs("t0") == list(range(15))
    assert handler.seqs("t2") == list(range(10))
    assert await deadletter.dead_letter_count(async_redis, settings, GROUP) == 0


async def test_a_held_trace_goes_to_the_next_lease_holder_in_order(
    settings: Settings, sync_redis: redis.Redis, async_redis: aioredis.Redis
) -> None:
    settings = fast(settings, partitions=1, max_attempts=1)
    failing = NodeDown({"t0"})
    publish(sync_redis, settings, traces_events(2, 10))
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=failing, replica_id="a"
    ):
        await wait_until_async(lambda: failing.seqs("t1") == list(range(10)))
        publish(sync_redis, settings, [make_event("t0", s) for s in range(10, 20)])

        async def all_read() -> bool:
            keys = Keys(settings.prefix, settings.partitions)
            info = await async_redis.xinfo_groups(keys.events(0))
            return int(info[0]["entries-read"]) == 30

        await wait_until_async(all_read)
    # Leaving with the trace still held leaves its entries pending, for the next holder.
    assert await pending(async_redis, settings) == 20
    healthy = NodeDown(set())
    async with GroupConsumer(
        redis=async_redis, settings=settings, group=GROUP, handler=healthy, replica_id="b"
    ):
        await wait_until_async(lambda: healthy.seqs("t0") == list(range(20)))
        await wait_until_async(lambda: no_pending(async_redis, settings))
    assert healthy.seqs("t1") == []
    assert failing.seqs("t0") == []


async def test_a_quiet_partition_reads_once_per_batch_and_a_busy_one_reads_ahead(
    settings: Settings,
    sync_redis: redis.Redis,
    async_redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Events arriving one at a time cost one read each (the blocking read; a read
    ahead would come back empty); a backlog is read ahead while batches are handled."""
    from bus.runtime.resp_link import RespLink

    reads = 0
    round_trip = RespLink.round_trip

    async def counted(self: RespLink, *args: object, **kwargs: object) -> list[object]:
        nonlocal reads
        reads += 1
        return await round_trip(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RespLink, "round_trip", counted)
    # Blocking reads that do not time out within the test (each would be one more read).
    settings = settings.replace(
        partitions=1, read_count=8, lease_ttl_ms=60_000, read_block_ms=5000, retry_backoff_ms=1
    )
    stream = Keys(settings.prefix, settings.partitions).events(0)
    recorder = Recorder()
    consumer = GroupConsumer(redis=async_redis, settings=settings, group=GROUP, handler=recorder)
    await consumer.start()
    try:
        await wait_until_async(lambda: consumer.owned_partitions == {0})
        await asyncio.sleep(0.3)  # past the pending re-read
        for seq in range(1, 11):
            before = reads
            sync_redis.xadd(stream, {ENTRY_FIELD: encode(make_event("t-quiet", seq))})
            await wait_until_async(lambda n=seq: len(recorder.seen) == n)  # type: ignore[misc]
            await asyncio.sleep(0.02)  # the reader is blocked again
            assert reads - before == 1, "a quiet partition read more than once per event"
        with sync_redis.pipeline(transaction=True) as pipe:  # a backlog: 5 full batches
            for seq in range(11, 51):
                pipe.xadd(stream, {ENTRY_FIELD: encode(make_event("t-quiet", seq))})
            pipe.execute()
        before = reads
        await wait_until_async(lambda: len(recorder.seen) == 50)
        assert [d.event.seq for d in recorder.seen] == list(range(1, 51))
        # Each full batch's successor was read while it was handled, and the
        # read ahead after the last found nothing: 5 + 1 reads, then the block.
        await asyncio.sleep(0.05)
        assert reads - before <= 7
    finally:
        await consumer.aclose()
