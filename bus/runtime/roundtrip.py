"""A partition reader's round trips to a standalone Redis, packed by hand.

Each read is one write and its replies: the ``XACK`` of the ids handled since the
last read, the ``XREADGROUP`` and, when asked, the ``XPENDING`` summary. Through
redis-py's pipeline (a command object per call, each of the ack's ids encoded
argument by argument, a reply callback per command) a bare read-and-ack loop
spends about 2.5 µs of CPU per entry; packed by hand, about 1.4
(``bench.consume``). The replies stay as Redis sent them: redis-py's parsing
would also build a dict per entry, which costs about as much as decoding the
event. A cluster client routes each command
to its slot's master and is used through its pipeline instead (see
:mod:`bus.runtime.reader`).

:func:`command` and :func:`round_trip` serve the other hand-packed paths too:
the publisher's connection set-up (:mod:`bus.producer.link`) and the fan-out
handler's writes (:mod:`bus.fanout.wire`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError


def command(*args: bytes) -> bytes:
    """One command as RESP."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def xack(stream: bytes, group: bytes, ids: Sequence[bytes]) -> bytes:
    """``XACK stream group id…`` as RESP."""
    return (
        b"*%d\r\n$4\r\nXACK\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
        % (len(ids) + 3, len(stream), stream, len(group), group)
    ) + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in ids)


def xreadgroup(
    stream: bytes, group: bytes, consumer: bytes, cursor: bytes, count: int, block: int | None
) -> bytes:
    """``XREADGROUP GROUP group consumer COUNT count [BLOCK block] STREAMS stream cursor``."""
    blocking = () if block is None else (b"BLOCK", b"%d" % block)
    head = (b"XREADGROUP", b"GROUP", group, consumer, b"COUNT", b"%d" % count)
    return command(*head, *blocking, b"STREAMS", stream, cursor)


async def round_trip(
    redis: aioredis.Redis, packed: Sequence[bytes], replies: int, *, check_health: bool = True
) -> list[Any]:
    """Write ``packed`` (``replies`` commands) on one of ``redis``'s pooled connections
    and read their replies, as Redis sent them.

    Raises the first error reply after reading every reply (the connection stays
    in step for its next user), like a pipeline with ``raise_on_error``; any other
    failure (a timeout, a cancel) leaves replies unread, so the connection is
    dropped.
    """
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(list(packed), check_health=check_health)
        answers: list[Any] = []
        error: ResponseError | None = None
        for _ in range(replies):
            try:
                answers.append(await conn.read_response())
            except ResponseError as exc:
                answers.append(exc)
                error = error or exc
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
    if error is not None:
        raise error
    return answers
