"""The dead-letter stream of a consumer group: what went there, and replay.

An entry lands in ``{prefix}:dlq:{group}`` when it cannot be decoded or when
the group's handler keeps failing on it. It keeps the original payload bytes
and where it came from, so that :func:`replay` can put it back on its
partition stream once the cause is fixed. Replay appends a new stream entry:
every group reads it again (they deduplicate by event id, as at-least-once
delivery already requires), and it arrives after the trace's later events.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from bus.keys import ENTRY_FIELD, Keys
from bus.settings import Settings

REASON_UNDECODABLE = "undecodable"
REASON_HANDLER_FAILED = "handler_failed"
REASON_REJECTED = "rejected"
"""The handler refused the event (:class:`bus.errors.EventRejected`): it breaks a bound."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a dead-letter stream."""

    id: str
    """The dead-letter entry's own id."""
    reason: str
    error: str
    partition: int
    entry_id: str
    """The id the entry had on its partition stream."""
    payload: bytes
    time: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe view (the payload as text when it is not binary)."""
        return {
            "id": self.id,
            "reason": self.reason,
            "error": self.error,
            "partition": self.partition,
            "entry_id": self.entry_id,
            "payload_bytes": len(self.payload),
            "time": self.time,
        }


def dead_letter_fields(
    *, reason: str, error: str, partition: int, entry_id: str, payload: bytes
) -> dict[bytes, bytes]:
    return {
        b"reason": reason.encode(),
        b"error": error.encode(errors="replace"),
        b"partition": str(partition).encode(),
        b"entry_id": entry_id.encode(),
        b"payload": payload,
        b"time": repr(time.time()).encode(),
    }


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _parse(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: bytes, default: str = "") -> str:
        value = fields.get(name)
        return default if value is None else value.decode(errors="replace")

    return DeadLetter(
        id=entry_id.decode(),
        reason=text(b"reason"),
        error=text(b"error"),
        partition=int(text(b"partition", "0")),
        entry_id=text(b"entry_id"),
        payload=fields.get(b"payload", b""),
        time=float(text(b"time", "0")),
    )


_Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def _xrange(redis: aioredis.Redis, key: str, **kwargs: Any) -> _Entries:
    # The client is a bytes client (decode_responses=False); its stubs do not know.
    return cast(_Entries, await redis.xrange(key, **kwargs))


async def list_dead_letters(
    redis: aioredis.Redis, settings: Settings, group: str, *, count: int = 100
) -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``group``."""
    raw = await _xrange(redis, Keys(settings.prefix).dlq(group), count=count)
    return [_parse(entry_id, fields) for entry_id, fields in raw]


async def dead_letter_count(redis: aioredis.Redis, settings: Settings, group: str) -> int:
    return int(await redis.xlen(Keys(settings.prefix).dlq(group)))


async def replay(
    redis: aioredis.Redis, settings: Settings, group: str, ids: Sequence[str] = ()
) -> list[str]:
    """Put dead letters back on their partition streams; all of them when ``ids`` is empty.

    Returns the ids of the dead letters replayed (unknown ids are skipped).
    The XADD comes before the XDEL, so a crash in between duplicates an entry
    rather than losing it.
    """
    keys = Keys(settings.prefix)
    letters = await _select(redis, keys.dlq(group), ids)
    replayed: list[str] = []
    for letter in letters:
        stream = keys.events(letter.partition % settings.partitions)
        await redis.xadd(stream, {ENTRY_FIELD: letter.payload}, maxlen=settings.stream_maxlen)
        await redis.xdel(keys.dlq(group), letter.id)
        replayed.append(letter.id)
    return replayed


async def _select(redis: aioredis.Redis, dlq: str, ids: Sequence[str]) -> list[DeadLetter]:
    if not ids:
        return [_parse(i, f) for i, f in await _xrange(redis, dlq)]
    letters = []
    for wanted in ids:
        for entry_id, fields in await _xrange(redis, dlq, min=wanted, max=wanted):
            letters.append(_parse(entry_id, fields))
    return letters
