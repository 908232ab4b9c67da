"""The publisher drains from the app's event loop, and hands back to its thread.

Against a redis-server these tests own (so that they can kill and pause it):
the loop drains while it runs; events left when it closes, when several loops
and threads publish, after fork and at interpreter exit all land, in order
per partition; an outage on the loop neither blocks nor loses more than the
drop policy allows.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus import Keys, Publisher, Settings
from bus.producer.loop_flusher import LoopFlusher
from tests.support.redis_server import OwnedRedis
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[OwnedRedis]:
    with OwnedRedis() as owned:
        owned.start()
        yield owned


def settings_for(server: OwnedRedis, **overrides: object) -> Settings:
    base = Settings(redis_url=server.url, prefix="lcbus-loop", partitions=2, redis_cluster="false")
    return base.replace(**overrides)


def landed(server: OwnedRedis, settings: Settings, partition: int = 0) -> list[bytes]:
    client = server.client()
    try:
        stream = Keys(settings.prefix, settings.partitions).events(partition)
        return [fields[b"e"] for _, fields in client.xrange(stream)]
    finally:
        client.close()


def numbered(tag: str, count: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(count)]


def loop_drains(publisher: Publisher) -> bool:
    flusher = publisher._loop_flusher
    return flusher is not None and flusher.link is not None and flusher.loop is _running()


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def publish_until_the_loop_drains(publisher: Publisher, payloads: list[bytes]) -> bool:
    """Publish, pausing now and then, and say whether the loop took the draining over
    (the thread links the loop on its next wake-up: on a busy machine, a while)."""
    drained_on_loop = False
    for index, payload in enumerate(payloads):
        if index % 50 == 0:
            await asyncio.sleep(0.005)
            drained_on_loop = drained_on_loop or loop_drains(publisher)
        publisher.publish(0, payload)
    for _ in range(2000):
        if drained_on_loop:
            break
        await asyncio.sleep(0.01)
        drained_on_loop = loop_drains(publisher)
    return drained_on_loop


def test_the_loop_drains_and_what_it_left_lands_after_it_closes(server: OwnedRedis) -> None:
    settings = settings_for(server, flush_interval_ms=50)  # a long linger: events left behind
    publisher = Publisher(settings=settings)
    sent = numbered("a", 2000)

    async def app() -> bool:
        drained = await publish_until_the_loop_drains(publisher, sent[:1990])
        for payload in sent[1990:]:  # still buffered when asyncio.run closes the loop
            publisher.publish(0, payload)
        return drained

    assert asyncio.run(app())
    wait_until(lambda: publisher.stats.published == 2000, within=10)
    assert landed(server, settings) == sent
    # The thread takes the draining back at its next check of the loop (every
    # WATCH_EVERY_S). On a busy machine asyncio.run's shutdown can outlast the
    # linger, so the loop may have sent the last events itself before it closed.
    wait_until(lambda: publisher._loop_flusher is None, within=5)
    assert publisher.stats.dropped == 0 and publisher.stats.errors == 0
    publisher.publish(0, b"sync after the loop")
    assert publisher.flush(5)
    assert landed(server, settings)[-1] == b"sync after the loop"
    publisher.close()


def test_bursts_past_the_batches_in_flight_keep_flowing_on_the_loop(server: OwnedRedis) -> None:
    settings = settings_for(server, batch_size=16)
    publisher = Publisher(settings=settings)
    sent = numbered("b", 3000)

    async def app() -> bool:
        for start in range(0, len(sent), 300):  # each burst is many batches at once
            for payload in sent[start : start + 300]:
                publisher.publish(0, payload)
            for _ in range(2000):  # the loop alone drains: no flush() to kick it
                if publisher.stats.published == start + 300:
                    break
                await asyncio.sleep(0.005)
        return loop_drains(publisher)

    assert asyncio.run(app())
    assert publisher.stats.published == 3000
    assert landed(server, settings) == sent
    publisher.close()


def test_flush_called_on_the_loop_returns_with_everything_sent(server: OwnedRedis) -> None:
    settings = settings_for(server)
    publisher = Publisher(settings=settings)
    sent = numbered("f", 1500)

    async def app() -> tuple[bool, bool]:
        drained = await publish_until_the_loop_drains(publisher, sent[:1000])
        for payload in sent[1000:]:
            publisher.publish(0, payload)
        return drained, publisher.flush(5)  # blocks the loop: the thread must do the sending

    assert asyncio.run(app()) == (True, True)
    assert landed(server, settings) == sent
    publisher.close()


def test_a_flusher_detached_while_its_link_opened_closes_the_link(server: OwnedRedis) -> None:
    """The thread's check opens a link for the loop while flush() on the loop detaches the
    flusher: the link is closed at once, not offered to a loop that may never attach it
    (seen as a socket left to the garbage collector when the loop closed first)."""
    publisher = Publisher(settings=settings_for(server))

    async def app() -> bool:
        detached = LoopFlusher(publisher, asyncio.get_running_loop())  # not the publisher's
        detached.watch()
        return detached.holds_link

    assert asyncio.run(app()) is False
    publisher.close()


def test_several_loops_and_threads_keep_each_partition_in_order(server: OwnedRedis) -> None:
    settings = settings_for(server, partitions=3)
    publisher = Publisher(settings=settings)

    async def loop_app(partition: int, tag: str) -> None:
        for index, payload in enumerate(numbered(tag, 3000)):
            publisher.publish(partition, payload)
            if index % 100 == 0:
                await asyncio.sleep(0.001)

    def plain_thread() -> None:
        for payload in numbered("s", 3000):
            publisher.publish(2, payload)

    threads = [
        threading.Thread(target=asyncio.run, args=(loop_app(0, "x"),)),
        threading.Thread(target=asyncio.run, args=(loop_app(1, "y"),)),
        threading.Thread(target=plain_thread),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert publisher.flush(10)
    assert landed(server, settings, 0) == numbered("x", 3000)
    assert landed(server, settings, 1) == numbered("y", 3000)
    assert landed(server, settings, 2) == numbered("s", 3000)
    assert publisher.stats.published == 9000
    publisher.close()


def test_a_forked_child_drains_on_its_own_loop(server: OwnedRedis) -> None:
    settings = settings_for(server)
    publisher = Publisher(settings=settings)

    async def parent_app() -> bool:
        return await publish_until_the_loop_drains(publisher, numbered("p", 500))

    assert asyncio.run(parent_app())
    pid = os.fork()
    if pid == 0:  # child: its own loop, its own link
        ok = False
        try:

            async def child_app() -> bool:
                return await publish_until_the_loop_drains(publisher, numbered("c", 500))

            ok = asyncio.run(child_app()) and publisher.flush(5)
            ok = ok and publisher.stats.published == 500
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    publisher.publish(0, b"parent after fork")
    assert publisher.flush(5)
    events = landed(server, settings)
    assert [e for e in events if e.startswith(b"c")] == numbered("c", 500)
    assert [e for e in events if e.startswith(b"p")] == [*numbered("p", 500), b"parent after fork"]
    publisher.close()


EXIT_SCRIPT = """
import asyncio, sys
from bus import Publisher, Settings
settings = Settings(redis_url=sys.argv[1], prefix="lcbus-loop", partitions=2,
                    redis_cluster="false", close_timeout_s=2.0, flush_interval_ms=20)
publisher = Publisher.shared(settings)

async def app():
    for i in range(5000):
        publisher.publish(0, str(i).encode())
        if i % 500 == 0:
            await asyncio.sleep(0.01)
    assert publisher._loop_flusher is not None and publisher._loop_flusher.link is not None

asyncio.run(app())
"""


def test_exit_right_after_the_loop_closes_flushes(server: OwnedRedis) -> None:
    result = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, server.url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert landed(server, settings_for(server)) == [str(i).encode() for i in range(5000)]


def test_redis_killed_under_the_loop_buffers_then_resumes(server: OwnedRedis) -> None:
    settings = settings_for(server, buffer_size=10_000)
    publisher = Publisher(settings=settings)

    async def app() -> None:
        assert await publish_until_the_loop_drains(publisher, numbered("before", 500))
        assert publisher.flush(5)
        server.kill()
        for index, payload in enumerate(numbered("during", 2000)):
            publisher.publish(0, payload)  # never blocks, never raises
            if index % 200 == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert publisher.stats.errors > 0
        server.start()  # an empty server on the same port
        for index, payload in enumerate(numbered("after", 500)):
            publisher.publish(0, payload)
            if index % 50 == 0:
                await asyncio.sleep(0.01)

    asyncio.run(app())
    assert publisher.flush(10)
    # The batch in flight when Redis died may have landed before: at least once.
    assert landed(server, settings) == [*numbered("during", 2000), *numbered("after", 500)]
    assert publisher.stats.dropped == 0 and publisher.stats.reconnects >= 1
    publisher.close()


def test_a_hung_redis_never_blocks_the_loop(server: OwnedRedis) -> None:
    settings = settings_for(server, buffer_size=1000, close_timeout_s=0.5)
    publisher = Publisher(settings=settings)

    async def app() -> None:
        assert await publish_until_the_loop_drains(publisher, numbered("warm", 200))
        server.pause()  # the link's writes are accepted, its replies never come
        for index, payload in enumerate(numbered("hung", 20_000)):
            publisher.publish(0, payload)
            if index % 1000 == 0:
                await asyncio.sleep(0)

    try:
        asyncio.run(app())
        in_flight = 4 * settings.batch_size  # batches written on the link before the pause
        assert publisher.stats.dropped >= 20_000 - settings.buffer_size - in_flight
        publisher.close()  # bounded by close_timeout_s, not by the hung server
    finally:
        server.resume()
