"""The flusher thread's own link: a batch answered in part, a link closed while idle.

Real Redis cannot be made to answer three entries of a pipelined batch and
then drop the connection on cue, so a scripted RESP peer on loopback does:
each of its first connections follows a plan (answer so many XADDs, close
after reading so many), every later one answers everything.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import hiredis

from bus import Publisher, Settings
from tests.support.waiting import wait_until

ANSWERED_ON_FIRST = 3


@dataclass(frozen=True)
class Plan:
    answer: int
    """XADDs answered; those read after them are not."""
    close_after: int
    """XADDs read before the connection is closed."""


@dataclass
class ScriptedRedis:
    """Answers XADDs with stream ids, each of the first connections by its plan."""

    sock: socket.socket
    plans: list[Plan]
    received: list[list[bytes]] = field(default_factory=list)
    """Per connection, the payload of every XADD it read, in order (the stats
    client's connection reads none)."""
    closed_first: threading.Event = field(default_factory=threading.Event)
    """Set once the first connection, having followed its plan, is closed."""
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            payloads: list[bytes] = []
            self.received.append(payloads)
            index = len(self.received) - 1
            plan = self.plans[index] if index < len(self.plans) else None
            threading.Thread(target=self._answer, args=(conn, payloads, plan), daemon=True).start()

    def _answer(self, conn: socket.socket, payloads: list[bytes], plan: Plan | None) -> None:
        reader = hiredis.Reader()
        with conn:
            while (data := conn.recv(65536)) and not self._stop.is_set():
                reader.feed(data)
                replies = b""
                while (command := reader.gets()) is not False:
                    if command[0].upper() != b"XADD":
                        replies += b"+OK\r\n"  # the stats client's handshake and SET
                        continue
                    payloads.append(command[-1])
                    if plan is not None and len(payloads) > plan.answer:
                        continue  # read, never answered
                    entry_id = f"1-{len(payloads)}".encode()
                    replies += b"$%d\r\n%s\r\n" % (len(entry_id), entry_id)
                conn.sendall(replies)
                if plan is not None and len(payloads) >= plan.close_after:
                    break
        if plan is not None and self.received and payloads is self.received[0]:
            self.closed_first.set()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@contextmanager
def scripted(*plans: Plan) -> Iterator[ScriptedRedis]:
    sock = socket.create_server(("127.0.0.1", 0))
    peer = ScriptedRedis(sock, list(plans))
    threading.Thread(target=peer.serve, daemon=True).start()
    try:
        yield peer
    finally:
        peer.close()


def publisher_for(peer: ScriptedRedis) -> Publisher:
    settings = Settings(
        redis_url=peer.url,
        redis_cluster="false",  # the peer speaks XADD only, not INFO
        prefix="lcbus-link",
        partitions=1,
        flush_interval_ms=200,
    )
    return Publisher(settings=settings)


def xadds_of(peer: ScriptedRedis) -> list[list[bytes]]:
    """What each link carried, leaving out the stats client's connection."""
    return [payloads for payloads in peer.received if payloads]


def publish_batch(publisher: Publisher, payloads: list[bytes]) -> None:
    for payload in payloads:  # all within the linger: one batch
        publisher.publish(0, payload)
    assert publisher.flush(10)


def test_a_batch_answered_in_part_counts_the_answered_and_resends_the_rest() -> None:
    sent = [b"p%d" % i for i in range(5)]
    with scripted(Plan(answer=ANSWERED_ON_FIRST, close_after=5)) as peer:
        publisher = publisher_for(peer)
        try:
            publish_batch(publisher, sent)
            stats = publisher.stats
        finally:
            publisher.close(1)

    first, second = xadds_of(peer)
    assert first == sent
    assert second == sent[ANSWERED_ON_FIRST:]
    assert stats.published == 5
    assert stats.dropped == 0
    assert stats.errors == 1
    assert "answered 3 of 5 entries, then closed the connection" in stats.last_error


def test_a_link_closed_while_idle_is_replaced_without_an_error() -> None:
    first_batch, second_batch = [b"a0", b"a1"], [b"b0", b"b1", b"b2"]
    # The first link answers its batch, then the peer drops it, as Redis drops
    # clients idle past its ``timeout``.
    with scripted(Plan(answer=2, close_after=2)) as peer:
        publisher = publisher_for(peer)
        try:
            publish_batch(publisher, first_batch)
            wait_until(peer.closed_first.is_set, within=10, what="the first link closed")
            publish_batch(publisher, second_batch)
            stats = publisher.stats
        finally:
            publisher.close(1)

    assert xadds_of(peer) == [first_batch, second_batch]
    assert stats.published == 5
    assert stats.errors == 0, stats.last_error
