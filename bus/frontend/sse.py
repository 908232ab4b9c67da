"""Server-Sent Events endpoints: a trace's stream (EventSource) and a thread's stream.

Each protocol event is one SSE frame whose ``id:`` is the event_id and whose
``data:`` is the protocol envelope; the default event type (``message``) is
kept so that ``EventSource.onmessage`` sees them. Two more frame types:

- ``event: error`` with ``{"code", "message"}``, then the stream closes:
  ``events_missed`` (the resume point left history; start over without
  ``Last-Event-ID``), ``invalid_position``, ``slow_consumer``. One more,
  ``unavailable`` (Redis did not answer), carries ``"retryable": true`` and a
  ``retry:`` hint: reconnecting with ``Last-Event-ID`` resumes exactly.
- ``event: reconnect`` with ``{"reason": "server_shutdown", "lastEventId"}``
  and a ``retry:`` hint when the frontend shuts down: the stream ends cleanly
  and the client reconnects (to any frontend) with ``Last-Event-ID``.
- The first frame also carries ``retry:``, so that a browser reconnects within a second.
- ``event: end`` after the topic's final event, then the stream closes. A
  browser's EventSource reconnects whenever a stream closes, so clients
  should call ``close()`` on ``end`` and on a non-retryable ``error``; a
  reconnect after the end gets ``end`` again at once.

A ``Last-Event-ID`` that is not an event id at all is refused with 400 before
the stream starts (an EventSource does not retry a 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TypeGuard

import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bus.access import check_access
from bus.access import error_response as _refuse
from bus.errors import AccessDenied, ServerDraining, StreamError
from bus.frontend.event_stream import EventStreamResponse
from bus.frontend.filters import Filter, FilterError, parse_channels
from bus.frontend.follow import Start, follow_batches
from bus.frontend.state import AppState
from bus.frontend.threads import RETRY_MS
from bus.history import StreamItem, Topic, is_event_id

log = logging.getLogger(__name__)

# The uvicorn transport of the connection, when the app found it (see FrontendApp).
TRANSPORT_SCOPE_KEY = "lcbus.transport"


def is_transport(value: object) -> TypeGuard[asyncio.WriteTransport]:
    """Whether ``value`` can be aborted and its write buffer measured, as a stream needs.

    Checked by its methods: uvloop's transports do not derive from asyncio's classes.
    """
    return all(
        callable(getattr(value, name, None))
        for name in ("abort", "get_write_buffer_size", "get_extra_info")
    )


class StreamRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The protocol's ``EventStreamRequest`` body."""

    channels: list[str]
    namespaces: list[list[str]] | None = None
    depth: int | None = None
    since: int | None = None


_decode_request = msgspec.json.Decoder(StreamRequest).decode


def _frame(event: str, body: Mapping[str, object], *, retry_ms: int | None = None) -> bytes:
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"{retry}event: {event}\ndata: {json.dumps(body)}\n\n".encode()


class _LiveSender:
    """Writes a live item to the client at once, from the hub's read loop (follow's
    ``inline``), through :meth:`EventStreamResponse.send_now` once the response exists.

    ``last`` is the id of the last event the stream has passed on, by either way.
    """

    __slots__ = ("flt", "last", "send_now")

    def __init__(self, flt: Filter, last: str | None) -> None:
        self.flt = flt
        self.last = last
        self.send_now: Callable[[bytes], bool] | None = None

    def __call__(self, item: StreamItem) -> bool:
        send_now = self.send_now
        if send_now is None:
            return False
        flt = self.flt
        if (flt.everything or flt.matches(item)) and not send_now(item.sse_frame()):
            return False
        self.last = item.event_id
        return True


async def _stream_frames(
    state: AppState, topic: Topic, start: Start, live: _LiveSender, watch: _SendWatch
) -> AsyncIterator[bytes]:
    flt = live.flt
    try:
        stream = follow_batches(
            state.hub,
            state.redis,
            state.keys,
            topic,
            start,
            on_overflow=watch.cut,
            stalled=watch.stalled,
            inline=live,
        )
        async for batch in stream:
            live.last = batch[-1].event_id
            # One chunk per batch: one send (and one socket write) for a whole burst.
            chunk = b"".join(
                item.sse_frame() for item in batch if flt.everything or flt.matches(item)
            )
            if chunk:
                # The response sends the chunk between this yield and the next step.
                watch.blocked_since = time.monotonic()
                yield chunk
                watch.blocked_since = None
    except ServerDraining:
        farewell = {"reason": "server_shutdown", "lastEventId": live.last or ""}
        yield _frame("reconnect", farewell, retry_ms=RETRY_MS)
        return
    except StreamError as exc:
        yield _frame("error", {"code": exc.code, "message": str(exc)})
        return
    except (RedisError, OSError) as exc:
        message = f"Redis is unavailable ({exc}); reconnect with Last-Event-ID to resume"
        retryable = {"code": "unavailable", "message": message, "retryable": True}
        yield _frame("error", retryable, retry_ms=RETRY_MS)
        return
    yield _frame("end", {"lastEventId": live.last or ""})


class _SendWatch:
    """Whether writes to one client are stuck, and how to cut it off when they are.

    When the client falls behind, its stream ends with ``slow_consumer`` as soon
    as the current write returns; if that write is still blocked ``stall_s``
    later (the client stopped reading), the connection is aborted: closing it
    would wait for buffered bytes the client never takes.
    """

    __slots__ = ("blocked_since", "stall_s", "transport")

    def __init__(self, request: Request, stall_s: float, send_buffer_bytes: int) -> None:
        transport = request.scope.get(TRANSPORT_SCOPE_KEY)
        self.transport = transport if is_transport(transport) else None
        self.stall_s = stall_s
        self.blocked_since: float | None = None
        if self.transport is not None and send_buffer_bytes > 0:
            _bound_send_buffer(self.transport, send_buffer_bytes)

    def stalled(self) -> bool:
        since = self.blocked_since
        return since is not None and time.monotonic() - since >= self.stall_s

    def cut(self) -> None:
        if self.transport is not None:
            asyncio.get_running_loop().call_later(self.stall_s, self._abort_if_stuck)

    def abort(self) -> None:
        """The send timed out: the connection's buffered bytes will never be taken."""
        if self.transport is not None:
            self.transport.abort()

    def _abort_if_stuck(self) -> None:
        transport = self.transport
        # Also when already closing: a close waits for the bytes the client never takes.
        if transport is not None and transport.get_write_buffer_size() > 0:
            log.info("aborting a slow consumer's connection: its writes stay blocked")
            transport.abort()


def _bound_send_buffer(transport: asyncio.WriteTransport, size: int) -> None:
    """Cap the kernel's send buffer of a stream's socket.

    Left to autotuning it grows to megabytes, which a client that stopped
    reading soaks up before any write blocks: with small events, that is
    minutes of a live run before the client is noticed.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _response(
    request: Request, state: AppState, topic: Topic, start: Start, flt: Filter
) -> Response:
    settings = state.settings
    watch = _SendWatch(request, settings.client_stall_s, settings.client_send_buffer_bytes)
    live = _LiveSender(flt, start.event_id)
    # drains: on shutdown the hub ends the frames with a "reconnect" frame (see
    # drain_on_shutdown), so the response waits for that before it stops the stream.
    response = EventStreamResponse(
        _stream_frames(state, topic, start, live, watch),
        retry_ms=RETRY_MS,
        ping_s=settings.ping_interval_s,
        send_timeout_s=settings.send_timeout_s,
        streams=state.streams,
        drains=True,
        on_send_timeout=watch.abort,
        transport=watch.transport,
    )
    if watch.transport is not None:
        live.send_now = response.send_now
    return response


SHUTDOWN_POLL_S = 0.5


def _uvicorn_exiting() -> bool:
    """Whether the uvicorn server of this process began to shut down.

    uvicorn installs its bound ``handle_exit`` as the SIGTERM handler, and says
    nothing to the app until its connections are gone: this is the one way to
    learn, while they are open, that they should say goodbye.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


async def drain_on_shutdown(state: AppState) -> None:
    """When the server shuts down (or ``state.shutdown`` is set), end every stream.

    Streams of the hub say "reconnect" and end (``hub.drain``); streams with no
    farewell of their own end at once; whatever is still open after most of
    ``drain_s`` is stopped, before the server's own deadline cuts it.
    """
    while not (state.shutdown.is_set() or _uvicorn_exiting()):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_POLL_S):
                await state.shutdown.wait()
    state.shutdown.set()
    state.streams.stop(graceful=False)
    state.hub.drain()
    await asyncio.sleep(state.settings.drain_s * 0.8)
    state.streams.stop(graceful=True)


def _bad_resume_point(last: str | None) -> JSONResponse | None:
    if last and not is_event_id(last):
        return _refuse(400, f"Last-Event-ID {last!r} is not an event id (<ms>-<seq>)")
    return None


async def trace_stream(request: Request) -> Response:
    """``GET /traces/{trace_id}/stream[?lastEventID=&channels=a,b&token=]``."""
    state: AppState = request.app.state.bus
    trace_id = request.path_params["trace_id"]
    try:
        check_access(request, state.settings, trace_id=trace_id)
        flt = Filter.build(parse_channels(request.query_params.get("channels")))
    except AccessDenied as exc:
        return _refuse(exc.status, exc.reason)
    except FilterError as exc:
        return _refuse(400, str(exc))
    last = request.headers.get("last-event-id") or request.query_params.get("lastEventID")
    refused = _bad_resume_point(last)
    if refused is not None:
        return refused
    return _response(request, state, Topic("trace", trace_id), Start(event_id=last or None), flt)


async def thread_stream(request: Request) -> Response:
    """``POST /threads/{thread_id}/stream`` with an ``EventStreamRequest`` body."""
    state: AppState = request.app.state.bus
    thread_id = request.path_params["thread_id"]
    try:
        check_access(request, state.settings, thread_id=thread_id)
        body = _decode_request(await request.body())
        flt = Filter.build(body.channels, body.namespaces, body.depth)
    except AccessDenied as exc:
        return _refuse(exc.status, exc.reason)
    except (msgspec.DecodeError, FilterError) as exc:
        return _refuse(400, f"invalid EventStreamRequest: {exc}")
    last = request.headers.get("last-event-id")
    refused = _bad_resume_point(last)
    if refused is not None:
        return refused
    start = Start(event_id=last) if last else Start(seq=body.since)
    return _response(request, state, Topic("thread", thread_id), start, flt)
