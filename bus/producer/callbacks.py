"""The LangChain callback handler that publishes every callback onto the bus.

Methods are plain sync methods and ``run_inline = True``: an async app calls
them inline on its event loop instead of hopping to a thread pool. Each builds
one event, encodes it and hands it to the :class:`~bus.producer.publisher.Publisher`'s
buffer. No network I/O, no lock held across I/O, and no exception ever
reaches the app: a failure is logged once per kind and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import redis as redis_lib
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import ChatGeneration, LLMResult

from bus import events as ev
from bus.producer.publisher import Publisher
from bus.producer.runs import Run, RunRegistry
from bus.producer.sanitize import encode_event, redact_text, safe, safe_str
from bus.settings import Settings

log = logging.getLogger(__name__)


def _error_callback(cls: type[ev.BaseEvent], name: str) -> Any:
    """The ``on_*_error`` callbacks differ only in the event they publish."""

    def callback(
        self: BusCallbackHandler,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._error(cls, error, run_id, parent_run_id)
        except Exception as exc:
            self._failed(name, exc)

    callback.__name__ = callback.__qualname__ = name
    return callback


class BusCallbackHandler(BaseCallbackHandler):
    """Publishes LangChain callbacks as bus events.

    Attach it per call (``config={"callbacks": [handler]}``) or to a model or
    chain (``.with_config(callbacks=[handler])``). One handler may serve any
    number of concurrent runs, sync and async.
    """

    run_inline = True
    raise_error = False

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        publisher: Publisher | None = None,
        redis: redis_lib.Redis | None = None,
    ) -> None:
        self.settings = settings or (publisher.settings if publisher else Settings())
        if publisher is None:
            publisher = (
                Publisher(settings=self.settings, redis=redis)
                if redis is not None
                else Publisher.shared(self.settings)
            )
        self.publisher = publisher
        self._runs = RunRegistry(self.settings.partitions)
        self._max = self.settings.max_field_bytes
        self.failures = 0
        self._failure_kinds: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> BusCallbackHandler:
        """A handler publishing to the Redis at ``url`` (other settings by keyword)."""
        return cls(settings=Settings(redis_url=url, **settings))

    def close(self, timeout: float | None = None) -> None:
        """Flush what is buffered (within ``timeout``) and stop the publisher."""
        self.publisher.close(timeout)

    # -- plumbing -------------------------------------------------------------

    def _emit(self, cls: type[ev.BaseEvent], run: Run, fields: dict[str, Any]) -> None:
        trace = run.trace
        event = cls(
            id=ev.new_event_id(),
            time=time.time(),
            run_id=run.run_id,
            trace_id=trace.trace_id,
            seq=next(trace.seq),
            parent_run_id=run.parent_run_id,
            name=run.name,
            run_type=run.run_type,
            tags=run.tags,
            metadata=run.metadata,
            source=self.publisher.source,
            **fields,
        )
        self.publisher.publish(trace.partition, encode_event(event))

    def _emit_token(self, cls: type[ev.BaseEvent], run: Run, fields: dict[str, Any]) -> None:
        """A per-token event: the run's name, tags and metadata ride on its start and end
        only (consumers that need them keep them per run)."""
        trace = run.trace
        event = cls(
            id=ev.new_event_id(),
            time=time.time(),
            run_id=run.run_id,
            trace_id=trace.trace_id,
            seq=next(trace.seq),
            parent_run_id=run.parent_run_id,
            run_type=run.run_type,
            source=self.publisher.source,
            **fields,
        )
        self.publisher.publish(trace.partition, encode_event(event))

    def _start(
        self,
        cls: type[ev.BaseEvent],
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
        run_type: str,
        fields: dict[str, Any],
    ) -> None:
        run = self._runs.start(
            run_id,
            parent_run_id,
            name=_run_name(serialized, kwargs),
            run_type=kwargs.get("run_type") or run_type,
            tags=list(tags or ()),
            metadata=safe(metadata, max_bytes=self._max) if metadata else {},
        )
        self._emit(cls, run, fields)

    def _finish(
        self,
        cls: type[ev.BaseEvent],
        run_id: UUID,
        parent_run_id: UUID | None,
        fields: dict[str, Any],
    ) -> None:
        run = self._runs.lookup(run_id, parent_run_id)
        try:
            self._emit(cls, run, fields)
        except Exception:
            # The run's end must go out, without its payload rather than not at all:
            # consumers wait for it to finish the run, its trace and its streams.
            self._emit(cls, run, {})
            raise
        finally:
            self._runs.end(run)

    def _error(
        self, cls: type[ev.BaseEvent], error: BaseException, run_id: UUID, parent: UUID | None
    ) -> None:
        fields = {
            "error": safe_str(redact_text(_error_text(error)), max_bytes=self._max),
            "error_type": type(error).__name__,
        }
        self._finish(cls, run_id, parent, fields)

    def _failed(self, callback: str, exc: Exception) -> None:
        self.failures += 1
        kind = f"{callback}:{type(exc).__name__}"
        if kind not in self._failure_kinds:
            self._failure_kinds.add(kind)
            log.warning("lcbus handler could not publish %s: %r", callback, exc)

    def _safe(self, value: Any) -> Any:
        return safe(value, max_bytes=self._max)

    # -- LLMs and chat models ---------------------------------------------------

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            fields = {
                "prompts": [safe_str(p, max_bytes=self._max) for p in prompts],
                "invocation_params": self._safe(kwargs.get("invocation_params") or {}),
            }
            self._start(
                ev.LLMStart,
                serialized,
                run_id,
                parent_run_id,
                tags,
                metadata,
                kwargs,
                "llm",
                fields,
            )
        except Exception as exc:
            self._failed("on_llm_start", exc)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            fields = {
                "messages": self._safe(messages),
                "invocation_params": self._safe(kwargs.get("invocation_params") or {}),
            }
            self._start(
                ev.ChatModelStart,
                serialized,
                run_id,
                parent_run_id,
                tags,
                metadata,
                kwargs,
                "chat_model",
                fields,
            )
        except Exception as exc:
            self._failed("on_chat_model_start", exc)

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            run = self._runs.get(run_id) or self._runs.lookup(run_id, parent_run_id)
            message = getattr(chunk, "message", None)
            tool_chunks = getattr(message, "tool_call_chunks", None)
            text = token if isinstance(token, str) else _blocks_text(token)
            if len(text) >= 1024:
                text = safe_str(text, max_bytes=self._max)
            if tool_chunks:
                fields = {"token": text, "tool_call_chunks": self._safe(tool_chunks)}
            else:
                fields = {"token": text}
            self._emit_token(ev.LLMNewToken, run, fields)
        except Exception as exc:
            self._failed("on_llm_new_token", exc)

    def on_stream_event(
        self,
        event: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            run = self._runs.get(run_id) or self._runs.lookup(run_id, parent_run_id)
            self._emit_token(ev.StreamEvent, run, {"data": self._safe(event)})
        except Exception as exc:
            self._failed("on_stream_event", exc)

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._finish(ev.LLMEnd, run_id, parent_run_id, self._llm_end_fields(response))
        except Exception as exc:
            self._failed("on_llm_end", exc)

    def _llm_end_fields(self, response: LLMResult) -> dict[str, Any]:
        first = (
            response.generations[0][0] if response.generations and response.generations[0] else None
        )
        usage = None
        if isinstance(first, ChatGeneration):
            usage = getattr(first.message, "usage_metadata", None)
        if usage is None and response.llm_output:
            usage = response.llm_output.get("token_usage") or response.llm_output.get("usage")
        return {
            "text": safe_str(str(first.text), max_bytes=self._max) if first is not None else "",
            "generations": self._safe(response.generations),
            "llm_output": self._safe(response.llm_output) if response.llm_output else None,
            "usage": self._safe(usage) if usage else None,
        }

    on_llm_error = _error_callback(ev.LLMError, "on_llm_error")
    on_chain_error = _error_callback(ev.ChainError, "on_chain_error")
    on_tool_error = _error_callback(ev.ToolError, "on_tool_error")
    on_retriever_error = _error_callback(ev.RetrieverError, "on_retriever_error")

    # -- chains -------------------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            fields = {"inputs": self._safe(inputs)}
            self._start(
                ev.ChainStart,
                serialized,
                run_id,
                parent_run_id,
                tags,
                metadata,
                kwargs,
                "chain",
                fields,
            )
        except Exception as exc:
            self._failed("on_chain_start", exc)

    def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._finish(ev.ChainEnd, run_id, parent_run_id, {"outputs": self._safe(outputs)})
        except Exception as exc:
            self._failed("on_chain_end", exc)

    # -- tools ----------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            structured = self._safe(inputs)
            # The argument string repeats the arguments: derived from the sanitized
            # ones when LangChain passes them, else with quoted credentials redacted.
            text = str(structured) if isinstance(inputs, dict) else redact_text(str(input_str))
            fields = {"input_str": safe_str(text, max_bytes=self._max), "inputs": structured}
            if kwargs.get("tool_call_id"):
                fields["tool_call_id"] = str(kwargs["tool_call_id"])
            self._start(
                ev.ToolStart,
                serialized,
                run_id,
                parent_run_id,
                tags,
                metadata,
                kwargs,
                "tool",
                fields,
            )
        except Exception as exc:
            self._failed("on_tool_start", exc)

    def on_tool_end(
        self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        try:
            self._finish(ev.ToolEnd, run_id, parent_run_id, {"output": self._safe(output)})
        except Exception as exc:
            self._failed("on_tool_end", exc)

    # -- retrievers -------------------------------------------------------------------

    def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            fields = {"query": safe_str(query, max_bytes=self._max)}
            self._start(
                ev.RetrieverStart,
                serialized,
                run_id,
                parent_run_id,
                tags,
                metadata,
                kwargs,
                "retriever",
                fields,
            )
        except Exception as exc:
            self._failed("on_retriever_start", exc)

    def on_retriever_end(
        self,
        documents: Sequence[Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            self._finish(
                ev.RetrieverEnd, run_id, parent_run_id, {"documents": self._safe(list(documents))}
            )
        except Exception as exc:
            self._failed("on_retriever_end", exc)

    # -- agents, text, retries, custom events -------------------------------------------

    def on_agent_action(
        self, action: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        try:
            run = self._runs.lookup(run_id, parent_run_id)
            fields = {
                "tool": str(getattr(action, "tool", "")),
                "tool_input": self._safe(getattr(action, "tool_input", None)),
                "log": safe_str(redact_text(str(getattr(action, "log", ""))), max_bytes=self._max),
            }
            self._emit(ev.AgentAction, run, fields)
        except Exception as exc:
            self._failed("on_agent_action", exc)

    def on_agent_finish(
        self, finish: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        try:
            run = self._runs.lookup(run_id, parent_run_id)
            fields = {
                "return_values": self._safe(getattr(finish, "return_values", {}) or {}),
                "log": safe_str(redact_text(str(getattr(finish, "log", ""))), max_bytes=self._max),
            }
            self._emit(ev.AgentFinish, run, fields)
        except Exception as exc:
            self._failed("on_agent_finish", exc)

    def on_text(
        self, text: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        try:
            run = self._runs.lookup(run_id, parent_run_id)
            self._emit(ev.Text, run, {"text": safe_str(str(text), max_bytes=self._max)})
        except Exception as exc:
            self._failed("on_text", exc)

    def on_retry(
        self, retry_state: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        try:
            run = self._runs.lookup(run_id, parent_run_id)
            outcome = getattr(retry_state, "outcome", None)
            error = outcome.exception() if outcome is not None and outcome.failed else None
            fields = {
                "attempt": int(getattr(retry_state, "attempt_number", 0) or 0),
                "error": (
                    safe_str(redact_text(_error_text(error)), max_bytes=self._max) if error else ""
                ),
            }
            self._emit(ev.Retry, run, fields)
        except Exception as exc:
            self._failed("on_retry", exc)

    def on_custom_event(
        self,
        name: str,
        data: Any,
        *,
        run_id: UUID,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            run = self._runs.lookup(run_id, kwargs.get("parent_run_id"))
            self._emit(ev.CustomEvent, run, {"event_name": str(name), "data": self._safe(data)})
        except Exception as exc:
            self._failed("on_custom_event", exc)


def _run_name(serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> str:
    """The run's name the way LangChain's tracer derives it."""
    name = kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ids = serialized.get("id")
        if ids:
            return str(ids[-1])
    return "Unnamed"


def _blocks_text(blocks: list[str | dict[str, Any]]) -> str:
    """The text of a token given as content blocks."""
    parts = [b if isinstance(b, str) else str(b.get("text", "")) for b in blocks]
    return "".join(parts)


def _error_text(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}" if error is not None else ""
