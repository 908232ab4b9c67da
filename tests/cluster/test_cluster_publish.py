"""The publisher on a Redis Cluster: mode detection, balanced partitions, per-node
batches, and MOVED/ASK followed without losing or reordering an event."""

from __future__ import annotations

import re

import pytest
import redis

from bus import Keys, Publisher, Settings
from bus.connect import is_cluster
from bus.errors import ConfigError
from bus.keys import key_slot
from tests.conftest import REDIS_URL, require_redis
from tests.support.redis_cluster import OwnedCluster


def stream_payloads(client: redis.Redis, settings: Settings) -> dict[int, list[bytes]]:
    keys = Keys(settings.prefix, settings.partitions)
    return {
        p: [fields[b"e"] for _, fields in client.xrange(keys.events(p))]
        for p in range(settings.partitions)
    }


def publish_numbered(publisher: Publisher, partitions: int, start: int, stop: int) -> None:
    for i in range(start, stop):
        publisher.publish(i % partitions, b"event-%d" % i)


def expected(partitions: int, stop: int) -> dict[int, list[bytes]]:
    return {p: [b"event-%d" % i for i in range(p, stop, partitions)] for p in range(partitions)}


def test_auto_mode_asks_the_seed_node(cluster: OwnedCluster) -> None:
    require_redis()
    assert is_cluster(Settings(redis_url=cluster.url)) is True
    assert is_cluster(Settings(redis_url=REDIS_URL)) is False
    assert is_cluster(Settings(redis_url=cluster.url, redis_cluster="false")) is False
    with pytest.raises(ConfigError, match=re.escape("could not ask redis://127.0.0.1:1/0")):
        is_cluster(Settings(redis_url="redis://127.0.0.1:1/0"))


def test_eight_partitions_spread_over_three_masters(
    cluster: OwnedCluster, cluster_settings: Settings
) -> None:
    keys = Keys(cluster_settings.prefix, 8)
    owners = [cluster.owner_port(key_slot(keys.events(p))) for p in range(8)]
    counts = sorted(owners.count(port) for port in cluster.ports)
    assert counts == [2, 3, 3]
    # Leases, trees and the trace index of a partition share its stream's slot.
    for p in range(8):
        slot = key_slot(keys.events(p))
        assert {key_slot(keys.lease("g", p)), key_slot(keys.tree("t", p))} == {slot}
        assert {key_slot(keys.trace_index(p)), key_slot(keys.trace_open(p))} == {slot}


def test_publisher_delivers_every_event_in_order(
    cluster_settings: Settings, cluster_client: redis.Redis
) -> None:
    with Publisher(settings=cluster_settings.replace(batch_size=64)) as publisher:
        publish_numbered(publisher, 8, 0, 220)
        assert publisher.flush(10)
        stats = publisher.stats
    assert (stats.published, stats.dropped, stats.errors) == (220, 0, 0)
    assert stream_payloads(cluster_client, cluster_settings) == expected(8, 220)


def test_publisher_follows_ask_then_moved_during_a_slot_migration(
    cluster: OwnedCluster, cluster_settings: Settings, cluster_client: redis.Redis
) -> None:
    keys = Keys(cluster_settings.prefix, 8)
    slot = key_slot(keys.events(0))
    source = cluster.owner_port(slot)
    target = next(port for port in cluster.ports if port != source)
    with Publisher(settings=cluster_settings) as publisher:
        publish_numbered(publisher, 8, 0, 80)
        assert publisher.flush(10)

        def publish_while_migrating() -> None:
            publish_numbered(publisher, 8, 80, 160)  # the source answers ASK for partition 0
            assert publisher.flush(10)

        cluster.move_slot(slot, target, while_migrating=publish_while_migrating)
        publish_numbered(publisher, 8, 160, 240)  # the publisher's slot map is stale: MOVED
        assert publisher.flush(10)
        stats = publisher.stats
    assert cluster.owner_port(slot) == target
    assert (stats.published, stats.dropped, stats.errors) == (240, 0, 0)
    assert stream_payloads(cluster_client, cluster_settings) == expected(8, 240)
    cluster.move_slot(slot, source)  # the layout the other tests expect
