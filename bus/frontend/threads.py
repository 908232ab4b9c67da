"""LangGraph's thread streams: ``POST /threads/{thread_id}/stream/events`` (SSE).

These are the routes LangGraph's own SDKs read (``client.threads.stream(...)``
in ``langgraph-sdk`` and ``@langchain/langgraph-sdk``); the WebSocket at the
same path is :mod:`bus.frontend.thread_socket`, the commands endpoint
:mod:`bus.frontend.commands`.

A thread id names a thread (runs sharing a ``thread_id``) or, for apps that
set none, a trace: a trace reads as a thread of one run. Which one is decided
when the first event exists; a client may connect before the run starts. A
thread token reads the thread, a trace token the trace.

The stream stays open after a run ends, as a thread stream does (another run
may follow); the SDKs end their session on the root run's terminal lifecycle
event and close it. Where it resumes: ``since_event_id`` (the durable cursor),
else ``Last-Event-ID``, else ``since`` (a sequence number), else the start of
history. The first frame is a ``retry:`` hint; a failure is one protocol
``ErrorResponse`` frame (``id: null``), then the stream closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from bus.access import check_access
from bus.errors import AccessDenied, SlowConsumer, StreamError
from bus.frontend.event_stream import EventStreamResponse
from bus.frontend.filters import Filter, FilterError
from bus.frontend.follow import Start, follow_batches
from bus.frontend.state import AppState
from bus.history import StreamItem, Topic, TopicKind

RETRY_MS = 1000
"""How soon a browser's EventSource reconnects after the stream drops."""
TOPIC_POLL_S = 0.25
"""How often a client waiting for a thread's first event looks for it."""

_encode = msgspec.json.Encoder().encode


class StreamEventsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The protocol's ``EventStreamRequest``, plus the durable cursor ``since_event_id``."""

    channels: list[str]
    namespaces: list[list[str]] | None = None
    depth: int | None = None
    since: int | None = None
    since_event_id: str | None = None


_decode_request = msgspec.json.Decoder(StreamEventsRequest).decode


def readable_kinds(conn: HTTPConnection, state: AppState, thread_id: str) -> frozenset[TopicKind]:
    """Whether ``conn`` may read ``thread_id`` as a thread, as a trace, or both; raises
    :class:`~bus.errors.AccessDenied` (with the thread's reason) when neither."""
    kinds: set[TopicKind] = set()
    refusal: AccessDenied | None = None
    for kind in ("thread", "trace"):
        try:
            if kind == "thread":
                check_access(conn, state.settings, thread_id=thread_id)
            else:
                check_access(conn, state.settings, trace_id=thread_id)
        except AccessDenied as exc:
            refusal = refusal or exc
        else:
            kinds.add(kind)
    if not kinds and refusal is not None:
        raise refusal
    return frozenset(kinds)


async def find_topic(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], *, wait: bool = True
) -> Topic | None:
    """The thread's topic once it has history (a thread first, then a trace of that id).

    With ``wait``, polls until one appears: the stream itself starts from
    history, so waiting loses nothing. Without it, None when neither exists.
    """
    candidates = [Topic(kind, thread_id) for kind in ("thread", "trace") if kind in kinds]
    while True:
        async with state.redis.pipeline(transaction=False) as pipe:
            for topic in candidates:
                pipe.exists(topic.history(state.keys))
            found = await pipe.execute()
        for topic, exists in zip(candidates, found, strict=True):
            if exists:
                return topic
        if not wait:
            return None
        await asyncio.sleep(TOPIC_POLL_S)


async def thread_batches(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], start: Start
) -> AsyncIterator[list[StreamItem]]:
    """Every event of the thread after ``start``, as :func:`follow_batches` gives them."""
    topic = await find_topic(state, thread_id, kinds)
    if topic is None:  # not reached: find_topic waits until there is one
        return
    async for batch in follow_batches(state.hub, state.redis, state.keys, topic, start):
        yield batch


def error_frame(code: str, message: str) -> bytes:
    """An unsolicited protocol ``ErrorResponse`` (``id: null``): why the stream ends."""
    return _encode({"type": "error", "id": None, "error": code, "message": message})


async def _frames(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], start: Start, flt: Filter
) -> AsyncIterator[bytes]:
    yield b"retry: %d\n\n" % RETRY_MS
    try:
        async for batch in thread_batches(state, thread_id, kinds, start):
            chunk = b"".join(
                item.sse_frame() for item in batch if flt.everything or flt.matches(item)
            )
            if chunk:
                yield chunk
    except StreamError as exc:
        yield b"data: %s\n\n" % error_frame(error_code(exc), f"{exc.code}: {exc}")
        return
    except (RedisError, OSError) as exc:
        # Said in a frame, never a cut stream: the SDKs reconnect from their last event id.
        yield b"data: %s\n\n" % error_frame("unavailable", f"Redis is unavailable: {exc}")
        return
    # A trace read as a thread has ended; a thread's stream never does. Either
    # way the connection stays until the client closes it (keep-alive pings go on).
    await asyncio.Event().wait()


def error_code(exc: StreamError) -> str:
    """The protocol's error code for a stream that cannot go on."""
    return "unknown_error" if isinstance(exc, SlowConsumer) else "invalid_argument"


def start_of(body: StreamEventsRequest, last_event_id: str | None) -> Start:
    if body.since_event_id:
        return Start(event_id=body.since_event_id)
    if last_event_id:
        return Start(event_id=last_event_id)
    return Start(seq=body.since)


def refusal(status: int, code: str, message: str) -> JSONResponse:
    """A refused request: the status, with a protocol ``ErrorResponse`` body."""
    body = {"type": "error", "id": None, "error": code, "message": message}
    return JSONResponse(body, status_code=status)


async def stream_events(request: Request) -> Response:
    """``POST /threads/{thread_id}/stream/events`` with an ``EventStreamRequest`` body."""
    state: AppState = request.app.state.bus
    thread_id = request.path_params["thread_id"]
    try:
        kinds = readable_kinds(request, state, thread_id)
        body = _decode_request(await request.body())
        flt = Filter.build(body.channels, body.namespaces, body.depth)
    except AccessDenied as exc:
        return refusal(exc.status, "permission_denied", exc.reason)
    except (msgspec.DecodeError, FilterError) as exc:
        return refusal(422, "invalid_argument", f"invalid EventStreamRequest: {exc}")
    start = start_of(body, request.headers.get("last-event-id"))
    # Not drains: a thread stream has no farewell frame; on shutdown it ends at once
    # and the SDK reconnects with its last event id.
    return EventStreamResponse(
        _frames(state, thread_id, kinds, start, flt),
        ping_s=state.settings.ping_interval_s,
        send_timeout_s=state.settings.send_timeout_s,
        streams=state.streams,
    )
