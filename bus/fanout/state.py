"""What the fan-out worker remembers about a trace between batches.

The conversion from bus events to protocol events needs a little memory per
run: where its events go (its namespace), which message blocks are open and
how much of each was already sent. The worker keeps it per trace in one
msgpack blob that it writes in the same script run as the trace's history
entries (see :mod:`bus.history`), together with the id of the last bus entry
applied. That makes a batch's effect atomic per trace: a replica taking over
mid-trace loads the blob and continues exactly where the history stops, and an
event already applied is recognised by its identity (producer and sequence)
and skipped, whether it comes back as a redelivered entry or as a second entry
of a batch the publisher re-sent.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from bus.events import BaseEvent
from bus.parsing import entry_order
from bus.seqranges import SeqRanges, add_seq

MAX_SEQ_RANGES = 1_000
"""Ranges of applied seqs kept per source. Each gap in a source's numbering (events
the publisher dropped) costs one; past the bound the two oldest merge, taking the
oldest gap for applied, so a hostile or broken producer cannot grow the state."""

MessageMode = Literal["", "token", "stream", "done"]
"""Where a model run's message comes from: ``""`` (no message yet), ``"token"``
(from on_llm_new_token), ``"stream"`` (from on_stream_event), or ``"done"``
(message finished)."""


class Block(msgspec.Struct, omit_defaults=True):
    """One content block of an open message; its wire index is its list position."""

    key: str
    """Source identity: ``text``, ``reasoning`` or ``tc:<index>`` for tool-call chunks."""
    kind: str
    sent: int = 0
    """Characters of delta payload (text, reasoning or args) already sent."""
    seen: int = 0
    """Characters seen from stream events (to skip what tokens already sent)."""
    id: str | None = None
    name: str | None = None
    index: int | str | None = None
    args: str = ""
    """Accumulated tool-call arguments (token mode), finalized at the message end."""


class RunStream(msgspec.Struct, omit_defaults=True):
    """One run's place in the trace's protocol stream."""

    ns: list[str]
    """Namespace of this run's events (its own for chains, the parent's for leaves)."""
    chain: bool = False
    """Whether the run opened a namespace (and so gets lifecycle events)."""
    mode: MessageMode = ""
    blocks: list[Block] = []
    tool_call_id: str = ""
    name: str = ""
    """The run's name (kept for graph runs: it names the subgraph they open)."""
    cause: str = ""
    """The ``tool_call_id`` of the tool run that called this run, if one did."""
    owns: list[str] = []
    """The LangGraph subgraph namespace this (graph) run opened; its end closes it."""
    message_meta: dict[str, str] = {}
    """A model run's ``provider``, ``model`` and ``thread_id``, from its start event's
    metadata: its token events do not repeat the run's metadata."""


class StreamState(msgspec.Struct, omit_defaults=True):
    """A trace's conversion state: its runs and how far the history got."""

    version: int = 0
    """Bumped on every write; a writer whose expected version is stale is refused."""
    last: str = ""
    """Stream entry id of the last bus event applied: an event without a ``source``
    (an older producer) is recognised by its entry id, at or before this one."""
    thread: str = ""
    """The ``thread_id`` this trace is also published to, once known."""
    runs: dict[str, RunStream] = {}
    applied: dict[str, SeqRanges] = {}
    """Per producing process (event ``source``), the ``seq`` of every event applied."""

    def take(self, entry_id: str, event: BaseEvent) -> bool:
        """Record the event as applied; False when it already was (a duplicate)."""
        if not event.source:
            if self.last and entry_order(entry_id) <= entry_order(self.last):
                return False
            self.last = entry_id
            return True
        ranges = self.applied.get(event.source)
        if ranges is None:
            ranges = self.applied[event.source] = []
        if not add_seq(ranges, event.seq):
            return False
        if len(ranges) > MAX_SEQ_RANGES:
            ranges[0][1] = ranges[1][1]
            del ranges[1]
        return True


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StreamState)


def dump(state: StreamState) -> bytes:
    return _encoder.encode(state)


def load(blob: bytes | None, version: bytes | None) -> StreamState:
    """The stored state (the version lives beside the blob), or a fresh one."""
    state = _decoder.decode(blob) if blob else StreamState()
    state.version = int(version) if version else 0
    return state
