"""Small parsers shared by the stages and the CLI.

Redis replies carry bytes or text depending on the client, stream entry ids
compare as numbers, not strings, and filters and options come as
``KEY=VALUE`` text. Each is parsed here once.
"""

from __future__ import annotations

from collections.abc import Iterable

from bus.errors import InvalidQuery


def text(value: object) -> str:
    """A Redis reply value as ``str`` (bytes decoded as UTF-8, anything else ``str()``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``, or bare ``ms``) as a tuple that sorts like Redis does."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def key_values(items: Iterable[str], *, option: str) -> dict[str, str]:
    """``KEY=VALUE`` items as a dict; raises :class:`InvalidQuery` naming ``option``."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidQuery(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs
