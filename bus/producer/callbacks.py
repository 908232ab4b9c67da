"""The LangChain callback handler that publishes every callback onto the bus.

Methods are plain sync methods and ``run_inline = True``: an async app calls
them inline on its event loop instead of hopping to a thread pool. Each builds
one event, encodes it and hands it to the :class:`~bus.producer.publisher.Publisher`'s
buffer. No network I/O, no lock held across I/O, and no exception ever
reaches the app: a failure is logged once per kind and counted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, cast
from uuid import UUID

import redis as redis_lib
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult

from bus import events as ev
from bus.producer import payloads
from bus.producer.emitter import RunEmitter
from bus.producer.publisher import Publisher
from bus.producer.sanitize import safe, safe_str
from bus.settings import Settings

log = logging.getLogger(__name__)

P = ParamSpec("P")


def guarded(callback: Callable[P, None]) -> Callable[P, None]:
    """Wrap a handler method so that nothing it raises reaches the app.

    A failure is counted in ``handler.failures`` and logged once per callback
    and exception type. LangChain would catch it too, but log it on every call
    (once per token when publishing fails) and re-raise it into the app for a
    handler with ``raise_error`` set.
    """
    name = callback.__name__

    @functools.wraps(callback)
    def guard(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception as exc:
            handler = cast("BusCallbackHandler", args[0])
            handler._failed(name, exc)

    return guard


def _error_callback(cls: type[ev.RunError], name: str) -> Any:
    """The ``on_*_error`` callbacks differ only in the event they publish."""

    def callback(
        self: BusCallbackHandler,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._events.finish(cls, run_id, parent_run_id, payloads.error(error, self._max))

    callback.__name__ = callback.__qualname__ = name
    return guarded(callback)


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
        self._events = RunEmitter(publisher, self.settings)
        self._max = self.settings.max_field_bytes
        self.failures = 0
        self._failure_kinds: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> BusCallbackHandler:
        """A handler publishing to the Redis at ``url`` (other settings by keyword)."""
        return cls(settings=Settings(redis_url=url, **settings))

    def trace_id_of(self, run_id: UUID) -> str | None:
        """The trace of a run this handler has seen start and not yet end."""
        run = self._events.runs.get(run_id)
        return run.trace.trace_id if run is not None else None

    def close(self, timeout: float | None = None) -> None:
        """Flush what is buffered (within ``timeout``) and stop the publisher."""
        self.publisher.close(timeout)

    # -- failures and payloads ---------------------------------------------------

    def _failed(self, callback: str, exc: Exception) -> None:
        self.failures += 1
        kind = f"{callback}:{type(exc).__name__}"
        if kind not in self._failure_kinds:
            self._failure_kinds.add(kind)
            log.warning("lcbus handler could not publish %s: %r", callback, exc)

    def _safe(self, value: Any) -> Any:
        return safe(value, max_bytes=self._max)

    # -- LLMs and chat models ---------------------------------------------------

    @guarded
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
        self._events.start(
            ev.LLMStart,
            serialized=serialized,
            run_id=run_id,
            parent_run_id=parent_run_id,
            tags=tags,
            metadata=metadata,
            callback_kwargs=kwargs,
            run_type="llm",
            fields={
                "prompts": [safe_str(p, max_bytes=self._max) for p in prompts],
                "invocation_params": self._safe(kwargs.get("invocation_params") or {}),
            },
        )

    @guarded
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
        self._events.start(
            ev.ChatModelStart,
            serialized=serialized,
            run_id=run_id,
            parent_run_id=parent_run_id,
            tags=tags,
            metadata=metadata,
            callback_kwargs=kwargs,
            run_type="chat_model",
            fields={
                "messages": self._safe(messages),
                "invocation_params": self._safe(kwargs.get("invocation_params") or {}),
            },
        )

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: Any = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        # Guarded by hand rather than by @guarded: the wrapper's extra call adds about
        # a tenth to this callback's own cost, and it runs once per token.
        try:
            events = self._events
            run = events.runs.get(run_id) or events.runs.lookup(run_id, parent_run_id)
            message = getattr(chunk, "message", None)
            tool_chunks = getattr(message, "tool_call_chunks", None)
            text = token if isinstance(token, str) else payloads.blocks_text(token)
            if len(text) >= 1024:
                text = safe_str(text, max_bytes=self._max)
            events.emit_new_token(run, text, self._safe(tool_chunks) if tool_chunks else None)
        except Exception as exc:
            self._failed("on_llm_new_token", exc)

    @guarded
    def on_stream_event(
        self,
        event: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        runs = self._events.runs
        run = runs.get(run_id) or runs.lookup(run_id, parent_run_id)
        self._events.emit_token(ev.StreamEvent, run, {"data": self._safe(event)})

    @guarded
    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._events.finish(ev.LLMEnd, run_id, parent_run_id, payloads.llm_end(response, self._max))

    on_llm_error = _error_callback(ev.LLMError, "on_llm_error")
    on_chain_error = _error_callback(ev.ChainError, "on_chain_error")
    on_tool_error = _error_callback(ev.ToolError, "on_tool_error")
    on_retriever_error = _error_callback(ev.RetrieverError, "on_retriever_error")

    # -- chains -------------------------------------------------------------------

    @guarded
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
        self._events.start(
            ev.ChainStart,
            serialized=serialized,
            run_id=run_id,
            parent_run_id=parent_run_id,
            tags=tags,
            metadata=metadata,
            callback_kwargs=kwargs,
            run_type="chain",
            fields={"inputs": self._safe(inputs)},
        )

    @guarded
    def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._events.finish(ev.ChainEnd, run_id, parent_run_id, {"outputs": self._safe(outputs)})

    # -- tools ----------------------------------------------------------------------

    @guarded
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
        self._events.start(
            ev.ToolStart,
            serialized=serialized,
            run_id=run_id,
            parent_run_id=parent_run_id,
            tags=tags,
            metadata=metadata,
            callback_kwargs=kwargs,
            run_type="tool",
            fields=payloads.tool_start(input_str, inputs, kwargs, self._max),
        )

    @guarded
    def on_tool_end(
        self, output: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._events.finish(ev.ToolEnd, run_id, parent_run_id, {"output": self._safe(output)})

    # -- retrievers -------------------------------------------------------------------

    @guarded
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
        self._events.start(
            ev.RetrieverStart,
            serialized=serialized,
            run_id=run_id,
            parent_run_id=parent_run_id,
            tags=tags,
            metadata=metadata,
            callback_kwargs=kwargs,
            run_type="retriever",
            fields={"query": safe_str(query, max_bytes=self._max)},
        )

    @guarded
    def on_retriever_end(
        self,
        documents: Sequence[Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        fields = {"documents": self._safe(list(documents))}
        self._events.finish(ev.RetrieverEnd, run_id, parent_run_id, fields)

    # -- agents, text, retries, custom events -------------------------------------------

    @guarded
    def on_agent_action(
        self, action: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        fields = payloads.agent_action(action, self._max)
        self._events.during(ev.AgentAction, run_id, parent_run_id, fields)

    @guarded
    def on_agent_finish(
        self, finish: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        fields = payloads.agent_finish(finish, self._max)
        self._events.during(ev.AgentFinish, run_id, parent_run_id, fields)

    @guarded
    def on_text(
        self, text: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        fields = {"text": safe_str(str(text), max_bytes=self._max)}
        self._events.during(ev.Text, run_id, parent_run_id, fields)

    @guarded
    def on_retry(
        self, retry_state: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._events.during(ev.Retry, run_id, parent_run_id, payloads.retry(retry_state, self._max))

    @guarded
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
        fields = {"event_name": str(name), "data": self._safe(data)}
        self._events.during(ev.CustomEvent, run_id, kwargs.get("parent_run_id"), fields)
