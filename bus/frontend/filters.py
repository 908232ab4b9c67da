"""Which events a client asked for: channels, namespace prefixes and depth.

The semantics are the protocol's ``EventStreamRequest``/``SubscribeParams``:
``channels`` match the event ``method``; an event matches a namespace prefix
when its ``params.namespace`` starts with it, and ``depth`` bounds how many
segments it may go below the prefix (``depth`` alone applies to the root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec

from bus.history import StreamItem

CHANNELS = frozenset(
    {"values", "updates", "messages", "tools", "lifecycle", "input", "checkpoints", "tasks"}
    | {"custom"}
)
_CUSTOM = re.compile(r"^custom:.+$")


class FilterError(ValueError):
    """A filter the client sent that cannot be applied (becomes a 400 / invalid_argument)."""


class _Params(msgspec.Struct):
    namespace: list[str] = []


class _Envelope(msgspec.Struct):
    params: _Params = msgspec.field(default_factory=_Params)


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


@dataclass(frozen=True, slots=True)
class Filter:
    channels: frozenset[str] | None = None
    namespaces: tuple[tuple[str, ...], ...] | None = None
    depth: int | None = None

    @classmethod
    def build(
        cls,
        channels: list[str] | None = None,
        namespaces: list[list[str]] | None = None,
        depth: int | None = None,
    ) -> Filter:
        if channels is not None:
            unknown = [c for c in channels if c not in CHANNELS and not _CUSTOM.match(c)]
            if unknown:
                raise FilterError(f"unknown channels {unknown}; known: {sorted(CHANNELS)}")
        if depth is not None and depth < 0:
            raise FilterError(f"depth must be >= 0, got {depth}")
        prefixes = tuple(tuple(n) for n in namespaces) if namespaces is not None else None
        if depth is not None and prefixes is None:
            prefixes = ((),)
        return cls(frozenset(channels) if channels else None, prefixes, depth)

    @property
    def everything(self) -> bool:
        return self.channels is None and self.namespaces is None

    def matches(self, item: StreamItem) -> bool:
        if self.channels is not None and item.method not in self.channels:
            return False
        if self.namespaces is None:
            return True
        try:
            namespace = tuple(_decode_envelope(item.payload).params.namespace)
        except msgspec.DecodeError:
            return False
        return any(self._under(namespace, prefix) for prefix in self.namespaces)

    def _under(self, namespace: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
        if namespace[: len(prefix)] != prefix:
            return False
        return self.depth is None or len(namespace) - len(prefix) <= self.depth


def any_match(filters: list[Filter], item: StreamItem) -> bool:
    return any(f.matches(item) for f in filters)


def parse_channels(text: str | None) -> list[str] | None:
    """The ``channels`` query parameter (a comma list) -> list, None when absent."""
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]
