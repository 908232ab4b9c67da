"""What a publisher counts, and how it leaves that in Redis for ``lcbus status``."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import msgspec
import redis

from bus.runtime.roundtrip import command

STATS_TTL_S = 30
"""A process that stopped reporting drops out of ``lcbus status`` after this."""


@dataclass(frozen=True, slots=True)
class PublisherStats:
    published: int
    dropped: int
    errors: int
    buffer_depth: int
    buffer_bytes: int
    """Encoded bytes of the buffered events."""
    reconnects: int
    batches: int
    connected: bool
    last_error: str


def stats_command(key: str, stats: PublisherStats) -> bytes:
    """``SET key stats EX STATS_TTL_S`` as RESP, for a publisher's own link."""
    return command(b"SET", key.encode(), _encoded(stats), b"EX", str(STATS_TTL_S).encode())


def _encoded(stats: PublisherStats) -> bytes:
    return msgspec.json.encode(asdict(stats))


def leave_stats(client: redis.Redis, key: str, stats: PublisherStats) -> None:
    """Store ``stats`` under ``key``, expiring; a failure is left to the next report.

    Any failure: the flusher thread calls this, and must outlive whatever the
    server at the URL answers (redis-py raises AttributeError on a handshake
    reply it cannot read, say).
    """
    with contextlib.suppress(Exception):
        client.set(key, _encoded(stats), ex=STATS_TTL_S)
