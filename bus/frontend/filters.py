"""Which events a client asked for: channels, namespace prefixes and depth.

The semantics are the protocol's ``EventStreamRequest``/``SubscribeParams``:
``channels`` match the event ``method``; an event matches a namespace prefix
when its ``params.namespace`` starts with it, and ``depth`` bounds how many
segments it may go below the prefix (``depth`` alone applies to the root).
A prefix segment without ``:`` also matches a segment of that name with any
id (``"research"`` matches ``"research:<task id>"``), as LangGraph's SDKs and
server match them.
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
CUSTOM = "custom"
_CUSTOM = re.compile(r"^custom:.+$")


class FilterError(ValueError):
    """A filter the client sent that cannot be applied (becomes a 400 / invalid_argument)."""


class _Params(msgspec.Struct):
    namespace: list[str] = []


class _Envelope(msgspec.Struct):
    params: _Params = msgspec.field(default_factory=_Params)


class _CustomData(msgspec.Struct):
    name: str | None = None


class _CustomParams(_Params):
    data: _CustomData = msgspec.field(default_factory=_CustomData)


class _CustomEnvelope(msgspec.Struct):
    params: _CustomParams = msgspec.field(default_factory=_CustomParams)


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_decode_custom = msgspec.json.Decoder(_CustomEnvelope).decode


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
        named_custom = False
        if self.channels is not None and item.method not in self.channels:
            if item.method != CUSTOM:
                return False
            named_custom = True  # ``custom:<name>`` asks for custom events of that name
        if self.namespaces is None and not named_custom:
            return True
        try:
            if named_custom:
                custom = _decode_custom(item.payload).params
                if self.channels is None or f"{CUSTOM}:{custom.data.name}" not in self.channels:
                    return False
                params: _Params = custom
            else:
                params = _decode_envelope(item.payload).params
        except msgspec.DecodeError:
            return False
        if self.namespaces is None:
            return True
        namespace = tuple(params.namespace)
        return any(self._under(namespace, prefix) for prefix in self.namespaces)

    def _under(self, namespace: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
        if len(namespace) < len(prefix):
            return False
        for want, have in zip(prefix, namespace, strict=False):
            if have != want and (":" in want or have.partition(":")[0] != want):
                return False
        return self.depth is None or len(namespace) - len(prefix) <= self.depth


def any_match(filters: list[Filter], item: StreamItem) -> bool:
    return any(f.matches(item) for f in filters)


def parse_channels(text: str | None) -> list[str] | None:
    """The ``channels`` query parameter (a comma list) -> list, None when absent."""
    if not text:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]
