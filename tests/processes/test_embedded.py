"""The demo's embedded Redis (fakeredis over TCP, ``bus/demo``) with real redis-py clients.

The server's idle handlers never look for work on their own here
(``idle_wait_s`` of an hour), and blocked reads block forever (``BLOCK 0``):
whatever a client receives came because the server woke for it, not because a
poll interval or a timeout ran out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from bus.demo.embedded import EmbeddedRedis
from bus.demo.fakeserver import FakeRedisServer
from tests.support.processes import ROOT
from tests.support.waiting import wait_until

WAIT_S = 10.0


@pytest.fixture
def server() -> Iterator[FakeRedisServer]:
    fake = FakeRedisServer(idle_wait_s=3600)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def connect(server: FakeRedisServer) -> Iterator[Callable[[str], redis.Redis]]:
    opened: list[redis.Redis] = []

    def client(name: str) -> redis.Redis:
        conn = redis.Redis.from_url(server.url, single_connection_client=True)
        conn.client_setname(name)
        opened.append(conn)
        return conn

    yield client
    for conn in opened:
        conn.close()


class InThread:
    """A command run on its own thread (it blocks), and what it answered."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.reply: Any = None
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.reply = self._call()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the command never returned"
        return self.reply


def wait_blocked(observer: redis.Redis, name: str) -> None:
    """Until the server lists the client ``name`` as blocked (flag ``b``, as Redis does)."""

    def blocked() -> bool:
        clients = observer.client_list()
        return any(c["name"] == name and "b" in c["flags"] for c in clients)

    wait_until(blocked, within=WAIT_S, what=f"{name} blocked")


def test_a_blocked_xreadgroup_returns_the_entry_another_connection_adds(
    connect: Callable[[str], redis.Redis],
) -> None:
    reader, writer = connect("reader"), connect("writer")
    writer.xgroup_create("events", "workers", id="0", mkstream=True)
    read = InThread(lambda: reader.xreadgroup("workers", "p0", {"events": ">"}, count=10, block=0))
    wait_blocked(writer, "reader")
    assert read.running  # nothing to read yet: it waits, it does not answer empty
    entry = writer.xadd("events", {"e": "token"})
    assert read.result() == [[b"events", [(entry, {b"e": b"token"})]]]
    pending: Any = writer.xpending("events", "workers")
    assert pending["pending"] == 1 and pending["consumers"][0]["name"] == b"p0"


def test_a_blocked_xreadgroup_without_count_answers_what_it_takes(
    connect: Callable[[str], redis.Redis],
) -> None:
    reader, writer = connect("reader"), connect("writer")
    writer.xgroup_create("events", "workers", id="0", mkstream=True)
    first = writer.xadd("events", {"e": "1"})
    # fakeredis moved the entry to the pending list, then blocked as if there were none.
    assert reader.xreadgroup("workers", "p0", {"events": ">"}, block=0) == [
        [b"events", [(first, {b"e": b"1"})]]
    ]
    read = InThread(lambda: reader.xreadgroup("workers", "p0", {"events": ">"}, block=0))
    wait_blocked(writer, "reader")
    second = writer.xadd("events", {"e": "2"})
    assert read.result() == [[b"events", [(second, {b"e": b"2"})]]]


def test_a_blocked_read_wakes_for_its_own_stream_and_sleeps_through_others(
    connect: Callable[[str], redis.Redis],
) -> None:
    reader, tail, writer = connect("reader"), connect("tail"), connect("writer")
    for stream in ("p0", "p1"):
        writer.xgroup_create(stream, "workers", id="0", mkstream=True)
    read = InThread(lambda: reader.xreadgroup("workers", "c", {"p0": ">"}, block=0))
    follow = InThread(lambda: tail.xread({"p0": "$"}, block=0))
    wait_blocked(writer, "reader")
    wait_blocked(writer, "tail")
    writer.xadd("p1", {"e": "elsewhere"})
    writer.set("unrelated", "1")
    wait_blocked(writer, "reader")
    wait_blocked(writer, "tail")
    assert read.running and follow.running
    entry = writer.xadd("p0", {"e": "here"})
    assert read.result() == [[b"p0", [(entry, {b"e": b"here"})]]]
    assert follow.result() == [[b"p0", [(entry, {b"e": b"here"})]]]


def test_a_blocking_read_of_pending_entries_answers_at_once(
    connect: Callable[[str], redis.Redis],
) -> None:
    reader = connect("reader")
    reader.xgroup_create("events", "workers", id="0", mkstream=True)
    # As on Redis: reading the consumer's own history never blocks, even when empty.
    assert reader.xreadgroup("workers", "p0", {"events": "0"}, block=0) == [[b"events", []]]


def test_a_published_message_reaches_a_subscriber_without_a_poll(
    server: FakeRedisServer, connect: Callable[[str], redis.Redis]
) -> None:
    publisher = connect("publisher")
    subscriber = redis.Redis.from_url(server.url).pubsub()
    try:
        subscriber.subscribe("live")
        assert subscriber.get_message(timeout=WAIT_S)["type"] == "subscribe"
        assert publisher.publish("live", b"token") == 1
        message = subscriber.get_message(timeout=WAIT_S)
        assert message is not None and message["data"] == b"token"
    finally:
        subscriber.close()


def test_an_error_reply_keeps_the_connection(connect: Callable[[str], redis.Redis]) -> None:
    client = connect("client")
    before = client.client_id()
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    sha = client.script_load("return 7")
    assert client.evalsha(sha, 0) == 7
    assert client.client_id() == before


def test_the_embedded_redis_runs_in_its_own_process_and_stops_with_it() -> None:
    embedded = EmbeddedRedis()
    with embedded as url:
        client = redis.Redis.from_url(url)
        try:
            assert client.ping() is True
            assert client.info()["os"] == "fakeredis"
        finally:
            client.close()
        pid = embedded.pid
        assert pid is not None and pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped


def test_the_embedded_redis_stops_when_its_parent_goes() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bus.demo.embedded"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().startswith(b"redis://127.0.0.1:")
        process.stdin.close()  # what the parent's death does to the pipe
        assert process.wait(WAIT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
