"""The ``messages`` channel: one protocol message per model run.

A model run reaches the bus in up to three shapes: ``on_llm_new_token``
(text and tool-call chunks), ``on_stream_event`` (already protocol
``MessagesData``, under ``stream_events(version="v3")``) and ``on_llm_end``
(the whole result, with usage). A model under v3 fires *both* token and
stream events for the same output, the first token before the first stream
event. So each run has one source: tokens until the first stream event
arrives, stream events from then on, and the stream's deltas are trimmed by
what the tokens already sent (per block, by character count). A run that
streamed nothing gets its message built from ``on_llm_end``, the way
``langchain_core``'s ``message_to_events`` replays a finished message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bus import events as ev
from bus.errors import EventRejected
from bus.fanout.protocol import APPENDABLE_DELTAS, MESSAGES, ProtoEvent
from bus.fanout.state import Block, RunStream

Emit = Callable[[ProtoEvent], None]

LC_ID_PREFIX = "lc_run-"
"""langchain-core names a streamed message ``lc_run--<run id>``; so do we."""
MAX_BLOCKS = 256
"""Content blocks per message. An index from an event is trusted only below it: the
state keeps one entry per block up to the highest index seen."""
MAX_TOOL_ARGS = 1_000_000
"""Characters of tool-call arguments one block may accumulate from token chunks."""
_USAGE_KEYS = ("input_tokens", "output_tokens", "total_tokens")
_USAGE_ALIASES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"}
_DETAIL_KEYS = {
    "input_token_details": ("audio", "cache_creation", "cache_read"),
    "output_token_details": ("audio", "reasoning"),
}


def streamed_message_id(run_id: str) -> str:
    """The protocol message id of a model run's message (not a webhook's ``webhook-id``)."""
    return f"{LC_ID_PREFIX}-{run_id}"


def message_meta(event: ev.BaseEvent) -> dict[str, str]:
    """What a message's ``metadata`` takes from its run's metadata."""
    meta: dict[str, str] = {}
    for source, target in (("ls_provider", "provider"), ("ls_model_name", "model")):
        value = event.metadata.get(source)
        if isinstance(value, str):
            meta[target] = value
    for key in ("thread_id", "langgraph_node"):
        value = event.metadata.get(key)
        if isinstance(value, str):
            meta[key] = value
    return meta


class MessageConverter:
    """Converts the model events of one run, writing into that run's state."""

    __slots__ = ("emit", "event", "run")

    def __init__(self, run: RunStream, event: ev.BaseEvent, emit: Emit) -> None:
        self.run = run
        self.event = event
        self.emit = emit

    def _out(self, data: dict[str, Any], merge_index: int | None = None) -> None:
        key = (self.event.run_id, merge_index) if merge_index is not None else None
        self.emit(ProtoEvent(MESSAGES, self.run.ns, self.event.time, data, merge_key=key))

    def _start_message(self) -> None:
        data: dict[str, Any] = {"event": "message-start", "role": "ai"}
        data["id"] = streamed_message_id(self.event.run_id)
        # Kept from the run's start; an event of an older producer carries it itself.
        data["metadata"] = {
            "run_id": self.event.run_id,
            **(self.run.message_meta or message_meta(self.event)),
        }
        self._out(data)

    # -- on_llm_new_token ---------------------------------------------------------

    def token(self, event: ev.LLMNewToken) -> None:
        if self.run.mode not in ("", "token"):
            return  # stream events own this run, or its message is finished
        if self.run.mode == "":
            self.run.mode = "token"
            self._start_message()
        if event.token:
            block = self._block("text", {"type": "text", "text": ""})
            self._delta(block, "text-delta", event.token)
        for chunk in event.tool_call_chunks:
            self._tool_chunk(chunk)

    def _block(self, key: str, skeleton: dict[str, Any]) -> tuple[int, Block]:
        for index, block in enumerate(self.run.blocks):
            if block.key == key:
                return index, block
        if len(self.run.blocks) >= MAX_BLOCKS:
            raise EventRejected(f"a message with more than {MAX_BLOCKS} content blocks")
        block = Block(key=key, kind=str(skeleton["type"]))
        self.run.blocks.append(block)
        index = len(self.run.blocks) - 1
        self._out({"event": "content-block-start", "index": index, "content": skeleton})
        return index, block

    def _delta(self, at: tuple[int, Block], kind: str, text: str) -> None:
        index, block = at
        block.sent += len(text)
        delta = {"type": kind, APPENDABLE_DELTAS[kind]: text}
        self._out({"event": "content-block-delta", "index": index, "delta": delta}, index)

    def _tool_chunk(self, chunk: dict[str, Any]) -> None:
        raw_index = chunk.get("index")
        call_id, name = _opt_str(chunk.get("id")), _opt_str(chunk.get("name"))
        skeleton: dict[str, Any] = {"type": "tool_call_chunk", "id": call_id, "name": name}
        skeleton["args"] = ""
        if isinstance(raw_index, int | str):
            skeleton["index"] = raw_index
        at = self._block(f"tc:{raw_index}", skeleton)
        block = at[1]
        block.id = call_id or block.id
        block.name = name or block.name
        args = chunk.get("args")
        if isinstance(args, str) and args:
            if len(block.args) + len(args) > MAX_TOOL_ARGS:
                raise EventRejected(f"tool-call arguments over {MAX_TOOL_ARGS} characters")
            block.args += args
            self._delta(at, "tool-call-delta", args)

    # -- on_stream_event ------------------------------------------------------------

    def stream(self, event: ev.StreamEvent) -> None:
        if self.run.mode == "done":
            return
        took_over = self.run.mode == "token"
        self.run.mode = "stream"
        data = dict(event.data)
        kind = data.get("event")
        if kind == "message-start":
            if not took_over:
                self._out(data)
        elif kind == "content-block-start":
            index = data.get("index")
            if isinstance(index, int) and index >= len(self.run.blocks):
                _check_index(index)
                while len(self.run.blocks) <= index:
                    self.run.blocks.append(Block(key=f"w{len(self.run.blocks)}", kind="?"))
                content = data.get("content")
                if isinstance(content, dict):
                    self.run.blocks[index].kind = str(content.get("type", "?"))
                self._out(data)
        elif kind == "content-block-delta":
            self._stream_delta(data)
        else:
            if kind == "message-finish":
                self.run.mode = "done"
            self._out(data)

    def _stream_delta(self, data: dict[str, Any]) -> None:
        index, delta = data.get("index"), data.get("delta")
        field = APPENDABLE_DELTAS.get(delta.get("type", "")) if isinstance(delta, dict) else None
        if not isinstance(index, int) or field is None or not isinstance(delta, dict):
            self._out(data)  # data or block deltas: nothing the tokens could have sent
            return
        _check_index(index)
        while len(self.run.blocks) <= index:
            self.run.blocks.append(Block(key=f"w{len(self.run.blocks)}", kind="?"))
        block = self.run.blocks[index]
        text = str(delta.get(field, ""))
        fresh = (
            text[max(0, block.sent - block.seen) :] if block.seen + len(text) > block.sent else ""
        )
        block.seen += len(text)
        block.sent = max(block.sent, block.seen)
        if fresh:
            delta = {**delta, field: fresh}
            self._out({"event": "content-block-delta", "index": index, "delta": delta}, index)

    # -- on_llm_end / on_llm_error ----------------------------------------------------

    def end(self, event: ev.LLMEnd) -> None:
        usage = _usage(event.usage)
        if self.run.mode == "":
            self._replay(event)
        elif self.run.mode == "token":
            for index, block in enumerate(self.run.blocks):
                content = _finalized(block, event.text)
                self._out({"event": "content-block-finish", "index": index, "content": content})
        if self.run.mode != "done":
            finish: dict[str, Any] = {"event": "message-finish"}
            if usage:
                finish["usage"] = usage
            self._out(finish)
        self.run.mode = "done"

    def _replay(self, event: ev.LLMEnd) -> None:
        """A message that did not stream, from the model's final result."""
        self._start_message()
        index = 0
        if event.text:
            self._out({"event": "content-block-start", "index": 0, "content": _text("")})
            delta = {"type": "text-delta", "text": event.text}
            self._out({"event": "content-block-delta", "index": 0, "delta": delta})
            self._out({"event": "content-block-finish", "index": 0, "content": _text(event.text)})
            index = 1
        for call in _tool_calls(event):
            call_id, name = _opt_str(call.get("id")), str(call.get("name") or "")
            start: dict[str, Any] = {"type": "tool_call", "id": call_id, "name": name, "args": {}}
            self._out({"event": "content-block-start", "index": index, "content": start})
            args = call.get("args")
            done = {**start, "args": args if isinstance(args, dict) else {}}
            self._out({"event": "content-block-finish", "index": index, "content": done})
            index += 1

    def error(self, event: ev.LLMError) -> None:
        if self.run.mode in ("token", "stream"):
            data = {"event": "error", "message": event.error or event.error_type}
            if event.error_type:
                data["code"] = event.error_type
            self._out(data)
        self.run.mode = "done"


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_BLOCKS:
        raise EventRejected(f"content block index {index} outside 0..{MAX_BLOCKS - 1}")


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _finalized(block: Block, text: str) -> dict[str, Any]:
    if block.kind != "tool_call_chunk":
        return _text(text)
    try:
        args = json.loads(block.args) if block.args else {}
    except ValueError:
        args = None
    if not isinstance(args, dict):
        error = "Failed to parse tool call arguments as JSON"
        return {
            "type": "invalid_tool_call",
            "id": block.id,
            "name": block.name,
            "args": block.args,
            "error": error,
        }
    return {"type": "tool_call", "id": block.id or "", "name": block.name or "", "args": args}


def _tool_calls(event: ev.LLMEnd) -> list[dict[str, Any]]:
    try:
        message = event.generations[0][0]["message"]
        calls = message.get("tool_calls") or []
    except (IndexError, KeyError, TypeError, AttributeError):
        return []
    return [call for call in calls if isinstance(call, dict)]


def _usage(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Usage as the protocol's ``UsageInfo``, from LangChain's or a provider's own keys."""
    if not raw:
        return {}
    usage: dict[str, Any] = {}
    for key, value in raw.items():
        name = _USAGE_ALIASES.get(key, key)
        if name in _USAGE_KEYS and isinstance(value, int) and not isinstance(value, bool):
            usage[name] = value
    for key, allowed in _DETAIL_KEYS.items():
        details = raw.get(key)
        if isinstance(details, dict):
            counts = {k: details[k] for k in allowed if isinstance(details.get(k), int)}
            if counts:
                usage[key] = counts
    return usage
