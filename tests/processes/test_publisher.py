"""The publisher never blocks or raises, follows its drop policy, and recovers.

These tests own a ``redis-server`` process, so that they can start it late,
kill it mid-run and bring it back.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig

from bus import BusCallbackHandler, Keys, Publisher, Settings
from tests.support.redis_server import OwnedRedis
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[OwnedRedis]:
    with OwnedRedis() as owned:
        yield owned


def settings_for(server: OwnedRedis, **overrides: object) -> Settings:
    base = Settings(redis_url=server.url, prefix="lcbus-pub", partitions=1, flush_interval_ms=1)
    return base.replace(**overrides)


def payloads_on(server: OwnedRedis, settings: Settings) -> list[bytes]:
    client = server.client()
    try:
        return [
            f[b"e"] for _, f in client.xrange(Keys(settings.prefix, settings.partitions).events(0))
        ]
    finally:
        client.close()


def numbered(start: int, stop: int) -> list[bytes]:
    return [str(i).encode() for i in range(start, stop)]


def test_redis_down_at_start_then_up(server: OwnedRedis) -> None:
    settings = settings_for(server, buffer_size=10_000)
    publisher = Publisher(settings=settings)
    for payload in numbered(0, 3000):
        publisher.publish(0, payload)  # must neither block nor raise
    wait_until(lambda: publisher.stats.errors > 0)
    assert publisher.stats.published == 0
    assert publisher.stats.buffer_depth == 3000
    server.start()
    wait_until(lambda: publisher.stats.published == 3000)
    assert payloads_on(server, settings) == numbered(0, 3000)
    assert publisher.stats.reconnects == 1 and publisher.stats.dropped == 0
    publisher.close()


@pytest.mark.parametrize("policy", ["oldest", "newest"])
def test_killed_mid_run_drops_by_policy_and_resumes(server: OwnedRedis, policy: str) -> None:
    server.start()
    settings = settings_for(server, buffer_size=500, drop_policy=policy)
    publisher = Publisher(settings=settings)
    for payload in numbered(0, 400):  # fits the buffer: nothing dropped before the kill
        publisher.publish(0, payload)
    assert publisher.flush(10)
    assert publisher.stats.published == 400
    server.kill()
    for payload in numbered(1000, 3000):
        publisher.publish(0, payload)
        if int(payload) % 200 == 0:
            time.sleep(0.01)  # let the flusher hit the dead server mid-run
    # A batch may be in flight against the dead server: wait for it to come back.
    wait_until(lambda: publisher.stats.dropped == 1500)
    server.start()  # a fresh, empty server on the same port
    wait_until(lambda: publisher.stats.published == 900)
    kept = numbered(2500, 3000) if policy == "oldest" else numbered(1000, 1500)
    assert payloads_on(server, settings) == kept
    assert publisher.stats.reconnects >= 1
    publisher.close()


def test_hanging_redis_never_blocks_the_app(server: OwnedRedis) -> None:
    server.start()
    settings = settings_for(server, buffer_size=1000, close_timeout_s=0.5)
    publisher = Publisher(settings=settings)
    server.pause()  # connections hang instead of failing
    try:
        for payload in numbered(0, 20_000):
            publisher.publish(0, payload)
        in_flight = settings.batch_size  # one batch may sit in the hung pipeline
        assert publisher.stats.dropped >= 20_000 - settings.buffer_size - in_flight
        publisher.close()  # bounded by close_timeout_s, not by the hung server
    finally:
        server.resume()
    # The thread, still in its send when close() returned, finishes it and closes its
    # link: nothing of it is left for the garbage collector (a socket would warn).
    thread = publisher._thread
    del publisher
    thread.join(30)
    assert not thread.is_alive()
    gc.collect()


def test_fork_gives_the_child_its_own_flusher(server: OwnedRedis) -> None:
    server.start()
    settings = settings_for(server)
    publisher = Publisher(settings=settings)
    publisher.publish(0, b"parent-before-fork")
    assert publisher.flush(5)
    pid = os.fork()
    if pid == 0:  # child
        ok = False
        try:
            publisher.publish(0, b"child")
            ok = publisher.flush(5) and publisher.stats.published == 1
        finally:
            os._exit(0 if ok else 1)
    publisher.publish(0, b"parent-after-fork")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert publisher.flush(5)
    assert sorted(payloads_on(server, settings)) == [
        b"child",
        b"parent-after-fork",
        b"parent-before-fork",
    ]
    publisher.close()


EXIT_SCRIPT = """
import sys
from bus import Publisher, Settings
settings = Settings(redis_url=sys.argv[1], prefix="lcbus-pub", partitions=1, close_timeout_s=1.0)
publisher = Publisher.shared(settings)
for i in range(5000):
    publisher.publish(0, str(i).encode())
"""


def run_exit_script(url: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_flushes_at_exit(server: OwnedRedis) -> None:
    server.start()
    result = run_exit_script(server.url)
    assert result.returncode == 0, result.stderr
    assert len(payloads_on(server, settings_for(server))) == 5000


def test_exit_is_bounded_when_redis_is_down(server: OwnedRedis) -> None:
    result = run_exit_script(server.url)  # nothing listens there
    assert result.returncode == 0, result.stderr


def test_stats_are_reported_to_redis(server: OwnedRedis) -> None:
    server.start()
    settings = settings_for(server)
    publisher = Publisher(settings=settings)
    publisher.publish(0, b"x")
    assert publisher.flush(5)
    publisher._report_stats()
    client: redis.Redis = server.client()
    stored = client.get(Keys(settings.prefix, settings.partitions).publisher(publisher.source))
    assert stored is not None and b'"published":1' in stored
    # The stats went over the flusher's own link: this client and that link, no other.
    assert len(client.client_list()) == 2
    client.close()
    publisher.close()


def test_refused_entries_are_counted_and_the_rest_flow(server: OwnedRedis) -> None:
    server.start()
    settings = settings_for(server, partitions=2)
    client = server.client()
    client.set(
        Keys(settings.prefix, settings.partitions).events(0), b"not a stream"
    )  # XADD answers WRONGTYPE
    publisher = Publisher(settings=settings)
    for payload in numbered(0, 6):
        publisher.publish(int(payload) % 2, payload)
    assert publisher.flush(5)
    assert [
        f[b"e"] for _, f in client.xrange(Keys(settings.prefix, settings.partitions).events(1))
    ] == [
        b"1",
        b"3",
        b"5",
    ]
    stats = publisher.stats
    assert (stats.dropped, stats.published) == (3, 3)
    assert "WRONGTYPE" in stats.last_error
    publisher.publish(1, b"after")  # the flusher is still alive
    assert publisher.flush(5)
    assert client.xlen(Keys(settings.prefix, settings.partitions).events(1)) == 4
    client.close()
    publisher.close()


def test_a_connection_redis_closed_while_idle_costs_no_error(server: OwnedRedis) -> None:
    server.start()
    client = server.client()
    client.config_set("timeout", 1)  # Redis closes clients idle for a second
    settings = settings_for(server)
    publisher = Publisher(settings=settings)
    publisher.publish(0, b"before")
    assert publisher.flush(5)
    # Until Redis has dropped every client but this one: the publisher's link too.
    wait_until(lambda: client.client_list() and len(client.client_list()) == 1, within=10)
    publisher.publish(0, b"after")
    assert publisher.flush(5)
    stats = publisher.stats
    publisher.close()
    assert payloads_on(server, settings) == [b"before", b"after"]
    assert (stats.published, stats.errors, stats.dropped) == (2, 0, 0), stats.last_error
    client.close()


class RecordingPublisher(Publisher):
    """A publisher that also remembers every payload handed to it, in order."""

    def __init__(self, *, settings: Settings) -> None:
        self.recorded: list[bytes] = []
        super().__init__(settings=settings)

    def publish(self, partition: int, payload: bytes) -> None:
        self.recorded.append(payload)
        super().publish(partition, payload)


def test_large_metadata_runs_during_an_outage_stay_within_the_byte_bound(
    server: OwnedRedis,
) -> None:
    bound, batch = 1_000_000, 8
    settings = settings_for(server, buffer_bytes=bound, batch_size=batch)
    publisher = RecordingPublisher(settings=settings)  # Redis is down: nothing is running yet
    handler = BusCallbackHandler(publisher=publisher)
    metadata = {"blob": "m" * 50_000}
    text = " ".join(f"t{i}" for i in range(150))
    try:
        for _ in range(30):
            model = GenericFakeChatModel(messages=iter([AIMessage(content=text)]))
            config: RunnableConfig = {"callbacks": [handler], "metadata": metadata}
            assert "".join(str(c.content) for c in model.stream("q", config=config)) == text
            assert publisher.stats.buffer_bytes <= bound
        published = sum(len(p) for p in publisher.recorded)
        assert published > 2 * bound and publisher.stats.dropped > 0
        server.start()
        assert publisher.flush(timeout=10)
    finally:
        handler.close()
    landed = payloads_on(server, settings)
    # The newest events, in order: what the oldest-first drops left.
    assert landed == publisher.recorded[-len(landed) :]
    largest = max(len(p) for p in publisher.recorded)
    assert sum(len(p) for p in landed) <= bound + batch * largest  # a batch may be in flight
    assert publisher.stats.dropped == len(publisher.recorded) - len(landed)
