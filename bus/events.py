"""The bus's event model: one tagged union of msgspec Structs.

Each LangChain callback has one event type, tagged by the callback's name in
the ``type`` field. Events travel as msgpack on Redis and as JSON at the edges
(CLI, HTTP); both codecs are built once here and reused.

Schema evolution: new fields get defaults, a field never changes type, and a
type this version does not know decodes to :class:`UnknownEvent` (and is
counted in :data:`decode_stats`) instead of raising.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import msgspec

from bus.errors import EventDecodeError

JsonValue = Any
"""A value made of dicts, lists, str, int, float, bool and None only."""


class BaseEvent(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=True):
    """Fields every event carries."""

    id: str
    time: float
    run_id: str
    trace_id: str
    seq: int
    parent_run_id: str | None = None
    name: str = ""
    run_type: str = ""
    tags: list[str] = []
    metadata: dict[str, JsonValue] = {}
    source: str = ""
    """The producing process (host:pid:nonce); ``seq`` is increasing per source."""


# The run life cycle: every run kind (model, chain, tool, retriever) has one event of
# each of these three bases, so a consumer matches on the base instead of on tags.
# The bases add no tag and no field of their own except RunError's, which every error
# event had already, so the wire format is the one the tags alone defined.


class RunStart(BaseEvent):
    """A run started; the subclass carries the run's inputs."""


class RunEnd(BaseEvent):
    """A run ended successfully; the subclass carries its outputs."""


class RunError(BaseEvent):
    """A run ended with an exception."""

    error: str = ""
    """``"ExcType: message"``."""
    error_type: str = ""


class LLMStart(RunStart, tag="on_llm_start"):
    prompts: list[str] = []
    invocation_params: dict[str, JsonValue] = {}


class ChatModelStart(RunStart, tag="on_chat_model_start"):
    messages: list[list[JsonValue]] = []
    invocation_params: dict[str, JsonValue] = {}


class LLMNewToken(BaseEvent, tag="on_llm_new_token"):
    token: str = ""
    tool_call_chunks: list[dict[str, JsonValue]] = []


class StreamEvent(BaseEvent, tag="on_stream_event"):
    """A ``MessagesData`` protocol event from ``stream_events(version="v3")``."""

    data: dict[str, JsonValue] = {}


class LLMEnd(RunEnd, tag="on_llm_end"):
    text: str = ""
    generations: list[list[JsonValue]] = []
    llm_output: dict[str, JsonValue] | None = None
    usage: dict[str, JsonValue] | None = None


class LLMError(RunError, tag="on_llm_error"):
    """A model run failed."""


class ChainStart(RunStart, tag="on_chain_start"):
    inputs: JsonValue = None


class ChainEnd(RunEnd, tag="on_chain_end"):
    outputs: JsonValue = None


class ChainError(RunError, tag="on_chain_error"):
    """A chain run failed."""


class ToolStart(RunStart, tag="on_tool_start"):
    input_str: str = ""
    inputs: JsonValue = None
    tool_call_id: str = ""
    """The id of the model's tool call this run answers, when LangChain passes one."""


class ToolEnd(RunEnd, tag="on_tool_end"):
    output: JsonValue = None


class ToolError(RunError, tag="on_tool_error"):
    """A tool run failed."""


class RetrieverStart(RunStart, tag="on_retriever_start"):
    query: str = ""


class RetrieverEnd(RunEnd, tag="on_retriever_end"):
    documents: list[JsonValue] = []


class RetrieverError(RunError, tag="on_retriever_error"):
    """A retriever run failed."""


class AgentAction(BaseEvent, tag="on_agent_action"):
    tool: str = ""
    tool_input: JsonValue = None
    log: str = ""


class AgentFinish(BaseEvent, tag="on_agent_finish"):
    return_values: dict[str, JsonValue] = {}
    log: str = ""


class Text(BaseEvent, tag="on_text"):
    text: str = ""


class Retry(BaseEvent, tag="on_retry"):
    attempt: int = 0
    error: str = ""


class CustomEvent(BaseEvent, tag="on_custom_event"):
    event_name: str = ""
    data: JsonValue = None


class TraceCompleted(BaseEvent, tag="trace_completed"):
    """Published by the trace worker when a trace's run tree is complete."""

    status: str = ""
    rollup: dict[str, JsonValue] = {}


class WebhookEndpointDisabled(BaseEvent, tag="webhook_endpoint_disabled"):
    """Published by the webhook worker when it disables a failing endpoint."""

    endpoint_id: str = ""
    url: str = ""
    reason: str = ""


class UnknownEvent(BaseEvent, tag="unknown"):
    """What a type this version does not know decodes to; consumers skip it."""

    original_type: str = ""


Event = (
    LLMStart
    | ChatModelStart
    | LLMNewToken
    | StreamEvent
    | LLMEnd
    | LLMError
    | ChainStart
    | ChainEnd
    | ChainError
    | ToolStart
    | ToolEnd
    | ToolError
    | RetrieverStart
    | RetrieverEnd
    | RetrieverError
    | AgentAction
    | AgentFinish
    | Text
    | Retry
    | CustomEvent
    | TraceCompleted
    | WebhookEndpointDisabled
    | UnknownEvent
)

EVENT_TYPES: dict[str, type[BaseEvent]] = {
    str(cls.__struct_config__.tag): cls for cls in Event.__args__ if cls is not UnknownEvent
}


class _Envelope(msgspec.Struct, kw_only=True):
    """The common fields alone, read from an event whose type is unknown."""

    type: str
    id: str = ""
    time: float = 0.0
    run_id: str = ""
    trace_id: str = ""
    seq: int = 0
    parent_run_id: str | None = None
    name: str = ""
    run_type: str = ""
    tags: list[str] = []
    metadata: dict[str, Any] = {}
    source: str = ""


class DecodeStats:
    """How many entries decoded to :class:`UnknownEvent` in this process."""

    __slots__ = ("unknown",)

    def __init__(self) -> None:
        self.unknown = 0


decode_stats = DecodeStats()

_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(Event)
_msgpack_envelope = msgspec.msgpack.Decoder(_Envelope)
_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(Event)
_json_envelope = msgspec.json.Decoder(_Envelope)

encode = _msgpack_encoder.encode
"""Event -> msgpack bytes (the Redis wire format)."""

encode_json = _json_encoder.encode
"""Event -> JSON bytes (the edge format)."""


def decode(data: bytes) -> Event:
    """msgpack bytes -> Event; an unknown type becomes :class:`UnknownEvent`."""
    try:
        event: Event = _msgpack_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return _fallback(data, exc, _msgpack_envelope)
    return event


def decode_json(data: bytes | str) -> Event:
    """JSON -> Event; an unknown type becomes :class:`UnknownEvent`."""
    try:
        event: Event = _json_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return _fallback(data, exc, _json_envelope)
    return event


def _fallback(data: bytes | str, exc: Exception, envelope_decoder: Any) -> Event:
    try:
        env: _Envelope = envelope_decoder.decode(data)
    except msgspec.DecodeError:
        raise EventDecodeError(f"not a bus event: {exc}") from exc
    if env.type in EVENT_TYPES or env.type == "unknown":
        # A known type with bad fields is malformed, not merely new.
        raise EventDecodeError(f"malformed {env.type} event: {exc}") from exc
    decode_stats.unknown += 1
    return UnknownEvent(
        id=env.id,
        time=env.time,
        run_id=env.run_id,
        trace_id=env.trace_id,
        seq=env.seq,
        parent_run_id=env.parent_run_id,
        name=env.name,
        run_type=env.run_type,
        tags=env.tags,
        metadata=env.metadata,
        source=env.source,
        original_type=env.type,
    )


def to_builtins(event: BaseEvent) -> dict[str, Any]:
    """An event as a plain dict, tag included (for JSON APIs)."""
    result: dict[str, Any] = msgspec.to_builtins(event)
    return result


def event_type(event: BaseEvent) -> str:
    """The ``type`` tag of an event."""
    return str(event.__struct_config__.tag)


class IdFactory:
    """Cheap unique event ids: a per-process random nonce and a counter.

    Re-seeded after fork, so that a forked worker never repeats its parent's ids.
    """

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self.nonce = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.nonce}-{next(self._counter):x}"


new_event_id = IdFactory()


def now() -> float:
    return time.time()
