"""A partition reader's round trips to a standalone Redis, packed by hand.

Each read is one write and its replies: the ``XACK`` of the ids handled since the
last read, the ``XREADGROUP`` and, when asked, the ``XPENDING`` summary. Through
redis-py's pipeline (a command object per call, each of the ack's ids encoded
argument by argument, a reply callback per command) a bare read-and-ack loop
spends about 2.5 µs of CPU per entry; packed by hand, as the publisher's batches
are (:mod:`bus.producer.resp`), about 1.4 (``bench.consume``). The replies stay
as Redis sent them: redis-py's parsing would also build a dict per entry, which
costs about as much as decoding the event. A cluster client routes each command to its slot's
master and is used through its pipeline instead (see :mod:`bus.runtime.reader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis


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


async def round_trip(redis: aioredis.Redis, commands: Sequence[bytes]) -> list[Any]:
    """Write the packed ``commands`` on one of ``redis``'s pooled connections and read
    one reply each. An error reply raises (a ``ResponseError``), as any failure does."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(list(commands))
        return [await conn.read_response() for _ in commands]
    except BaseException:
        # Replies left unread would answer the connection's next user: start over.
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
