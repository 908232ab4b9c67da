"""One trace across processes: where a run is, as strings a request carries along.

In the parent, :func:`trace_headers` (called inside a run: a tool, a
``RunnableLambda``, a chain step) returns a few strings naming the current run,
its trace and its thread, to send with the request (as HTTP headers, say). In
the child, :func:`continue_trace` turns them back into the config of a run: the
child's runs then land under the parent's run in the parent's tree, and the
trace completes once the parent's root and the child's runs have all ended.

LangChain passes only a run's parent to callbacks; the trace id travels in the
run's metadata (``lcbus_trace_id``) and the parent run id in the callback
manager, so LangChain's own tracers (LangSmith's included) nest the child
under the same parent run id too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager, CallbackManager
from langchain_core.runnables import RunnableConfig, ensure_config

from bus.errors import TraceContextError
from bus.producer.callbacks import BusCallbackHandler
from bus.producer.runs import TRACE_ID_METADATA_KEY

TRACE_HEADER = "lcbus-trace-id"
PARENT_RUN_HEADER = "lcbus-parent-run-id"
THREAD_HEADER = "lcbus-thread-id"
THREAD_METADATA_KEY = "thread_id"
MAX_THREAD_ID_CHARS = 256


def trace_headers(config: RunnableConfig | None = None) -> dict[str, str]:
    """The current run, its trace and its thread, as strings to send along.

    Call it inside a run traced by a :class:`BusCallbackHandler` (a tool, a
    ``RunnableLambda``, any step); ``config`` defaults to the one LangChain set
    for the current step. Empty when there is no current run or no bus handler
    (tracing is off): the child then starts a trace of its own.
    """
    config = config if config is not None else ensure_config()
    manager = config.get("callbacks")
    if not isinstance(manager, BaseCallbackManager) or manager.parent_run_id is None:
        return {}
    handler = _bus_handler(manager.handlers + manager.inheritable_handlers)
    if handler is None:
        return {}
    parent = manager.parent_run_id
    metadata = {**manager.inheritable_metadata, **(config.get("metadata") or {})}
    trace_id = handler.trace_id_of(parent) or metadata.get(TRACE_ID_METADATA_KEY) or str(parent)
    headers = {TRACE_HEADER: str(trace_id), PARENT_RUN_HEADER: str(parent)}
    thread = metadata.get(THREAD_METADATA_KEY)
    if thread:
        headers[THREAD_HEADER] = str(thread)
    return headers


def continue_trace(
    headers: Mapping[str, str],
    handler: BusCallbackHandler,
    *,
    callbacks: list[BaseCallbackHandler] | None = None,
    flush_timeout: float | None = None,
) -> ContinuedTrace:
    """The config that continues the parent's trace from :func:`trace_headers`'s strings.

    ``headers`` may hold anything else too (all of a request's headers, in any
    case); without the trace's strings the runs start a trace of their own.
    ``callbacks`` are more handlers for the runs. Use the result as a context
    manager (``with`` or ``async with``): leaving it flushes ``handler``'s
    events to Redis (within ``flush_timeout``), so that they are on the bus
    before the child answers and the parent's run ends.
    """
    found = {name.lower(): value for name, value in headers.items()}
    handlers: list[BaseCallbackHandler] = [handler, *(callbacks or ())]
    if TRACE_HEADER not in found and PARENT_RUN_HEADER not in found:
        return ContinuedTrace(handler, {"callbacks": handlers}, flush_timeout)
    trace_id = _run_id(found, TRACE_HEADER)
    parent = _run_id(found, PARENT_RUN_HEADER)
    metadata = {TRACE_ID_METADATA_KEY: str(trace_id)}
    thread = found.get(THREAD_HEADER)
    if thread is not None:
        if not thread or len(thread) > MAX_THREAD_ID_CHARS or not thread.isprintable():
            raise TraceContextError(f"{THREAD_HEADER} must be 1 to 256 printable characters")
        metadata[THREAD_METADATA_KEY] = thread
    manager = CallbackManager(
        handlers=handlers, inheritable_handlers=handlers, parent_run_id=parent
    )
    manager.add_metadata(metadata)
    return ContinuedTrace(handler, {"callbacks": manager, "metadata": metadata}, flush_timeout)


class ContinuedTrace:
    """A run config continuing a trace; its ``with`` block flushes the handler at the end."""

    def __init__(
        self, handler: BusCallbackHandler, config: RunnableConfig, flush_timeout: float | None
    ) -> None:
        self.handler = handler
        self.config = config
        self._flush_timeout = flush_timeout

    def __enter__(self) -> RunnableConfig:
        return self.config

    def __exit__(self, *exc_info: object) -> None:
        self.handler.publisher.flush(self._flush_timeout)

    async def __aenter__(self) -> RunnableConfig:
        return self.config

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.handler.publisher.flush, self._flush_timeout)


def _bus_handler(handlers: list[BaseCallbackHandler]) -> BusCallbackHandler | None:
    return next((h for h in handlers if isinstance(h, BusCallbackHandler)), None)


def _run_id(found: Mapping[str, str], name: str) -> uuid.UUID:
    value = found.get(name)
    if value is None:
        raise TraceContextError(
            f"{name} is missing: send both {TRACE_HEADER} and {PARENT_RUN_HEADER}"
        )
    try:
        return uuid.UUID(value)
    except ValueError:
        raise TraceContextError(f"{name} is not a run id (a UUID): {value[:64]!r}") from None


__all__ = [
    "PARENT_RUN_HEADER",
    "THREAD_HEADER",
    "TRACE_HEADER",
    "ContinuedTrace",
    "TraceContextError",
    "continue_trace",
    "trace_headers",
]
