"""The RESP the publisher writes by hand: its XADD batches as one write each.

Packing by hand (a fixed head per partition, then the payload) costs about a
tenth of redis-py's pipeline per event, which matters because the publisher's
time is the app's: it runs on the app's event loop or on a thread sharing the
app's GIL.
"""

from __future__ import annotations

from typing import Any

import redis

from bus.keys import ENTRY_FIELD

Entry = tuple[bytes, bytes]
"""(the partition's packed XADD head, the payload)."""


def xadd_head(key: str, maxlen: int) -> bytes:
    """RESP for ``XADD key MAXLEN ~ maxlen * e``, missing only the payload."""
    args = [b"XADD", key.encode(), b"MAXLEN", b"~", str(maxlen).encode(), b"*", ENTRY_FIELD]
    return b"*8\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def packed(batch: list[Entry]) -> bytes:
    """The batch's XADDs as one RESP write."""
    parts: list[bytes] = []
    for head, payload in batch:
        parts += (head, b"$%d\r\n" % len(payload), payload, b"\r\n")
    return b"".join(parts)


def send_batch(client: redis.Redis, batch: list[Entry]) -> tuple[int, str] | None:
    """The batch's XADDs in one round trip on one of ``client``'s pooled connections;
    (refused, last error) if Redis refused some."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed(batch)], check_health=False)  # type: ignore[no-untyped-call]
        return _read_replies(conn, len(batch))
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]  # replies out of step: start over
        raise
    finally:
        pool.release(conn)


def _read_replies(conn: Any, count: int) -> tuple[int, str] | None:
    """Read ``count`` replies on a redis-py connection; (refused, last error) if some failed."""
    refused, last = 0, ""
    for _ in range(count):
        try:
            conn.read_response()
        except redis.ResponseError as exc:
            refused, last = refused + 1, f"ResponseError: {exc}"
    return (refused, last) if refused else None
