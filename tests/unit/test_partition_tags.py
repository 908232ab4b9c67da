"""Partition hash tags: distinct, and spread over the slot range as keys.py says."""

from __future__ import annotations

import pytest
from redis.crc import key_slot as redis_key_slot

from bus.keys import SLOTS, Keys, key_slot, partition_tags


@pytest.mark.parametrize("partitions", [1, 3, 8, 16, 64])
def test_each_partition_lands_near_the_centre_of_its_share_of_the_slots(partitions: int) -> None:
    tags = partition_tags(partitions)
    assert len(set(tags)) == partitions
    width = SLOTS / partitions
    for i, tag in enumerate(tags):
        assert tag.startswith(f"{i}.") or tag == str(i)
        centre = (i + 0.5) * width
        assert abs(key_slot(tag) - centre) <= max(1, SLOTS // (16 * partitions))


def test_a_partitions_keys_share_its_stream_slot_and_traces_keep_theirs() -> None:
    keys = Keys("p", 8)
    for p in range(8):
        slot = key_slot(keys.events(p))
        assert key_slot(keys.lease("fanout", p)) == slot
        assert key_slot(keys.tree("t", p)) == key_slot(keys.trace_done("t", p)) == slot
        assert key_slot(keys.trace_index(p)) == key_slot(keys.trace_open(p)) == slot
    trace = {key_slot(k) for k in (keys.history("t"), keys.history_seq("t"), keys.channel("t"))}
    assert trace == {key_slot(keys.fanout_state("t"))}
    thread = {key_slot(keys.thread_history("h")), key_slot(keys.thread_copied("h"))}
    assert thread == {key_slot(keys.thread_channel("h"))}


def test_key_slot_matches_redis_for_tags_and_plain_keys() -> None:
    # CLUSTER KEYSLOT examples of the Redis documentation.
    assert key_slot("somekey") == 11058
    assert key_slot("foo{hash_tag}") == key_slot("bar{hash_tag}") == 2515
    # And redis-py's own implementation, empty and unclosed tags included.
    for key in ("a{}b", "{}x", "x{y", "lcbus:events:{3.31}", "}{z}"):
        assert key_slot(key) == redis_key_slot(key.encode())


def test_partitioned_keys_need_the_partition_count() -> None:
    with pytest.raises(ValueError, match="partitions"):
        Keys("p").events(0)
