"""Server-Sent Events endpoints: a trace's stream (EventSource) and a thread's stream.

Each protocol event is one SSE frame whose ``id:`` is the event_id and whose
``data:`` is the protocol envelope; the default event type (``message``) is
kept so that ``EventSource.onmessage`` sees them. Two more frame types:

- ``event: error`` with ``{"code", "message"}``, then the stream closes:
  ``events_missed`` (the resume point left history; start over without
  ``Last-Event-ID``), ``invalid_position``, ``slow_consumer``.
- The first frame also carries ``retry:``, so that a browser reconnects within a second.
- ``event: end`` after the topic's final event, then the stream closes. A
  browser's EventSource reconnects whenever a stream closes, so clients
  should call ``close()`` on either; a reconnect after the end gets ``end``
  again at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import msgspec
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from bus.access import check_access
from bus.access import error_response as _refuse
from bus.errors import AccessDenied, StreamError
from bus.frontend.filters import Filter, FilterError, parse_channels
from bus.frontend.follow import Start, follow_batches
from bus.frontend.state import AppState
from bus.frontend.threads import RETRY_MS
from bus.history import Topic


class StreamRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The protocol's ``EventStreamRequest`` body."""

    channels: list[str]
    namespaces: list[list[str]] | None = None
    depth: int | None = None
    since: int | None = None


_decode_request = msgspec.json.Decoder(StreamRequest).decode


def _frame(event: str, body: dict[str, str]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(body)}\n\n".encode()


def _frames(state: AppState, topic: Topic, start: Start, flt: Filter) -> AsyncIterator[bytes]:
    return _with_retry_hint(_stream_frames(state, topic, start, flt))


async def _with_retry_hint(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The first frame carries ``retry:`` (how soon a browser's EventSource reconnects,
    say after a frontend restart) as a field of its own, not as a data-less frame
    that a client parsing every frame's data would trip over."""
    hint = b"retry: %d\n" % RETRY_MS
    async for chunk in frames:
        yield hint + chunk
        hint = b""


async def _stream_frames(
    state: AppState, topic: Topic, start: Start, flt: Filter
) -> AsyncIterator[bytes]:
    last = start.event_id
    try:
        stream = follow_batches(state.hub, state.redis, state.keys, topic, start)
        async for batch in stream:
            last = batch[-1].event_id
            # One chunk per batch: one send (and one socket write) for a whole burst.
            chunk = b"".join(
                b"id: %s\ndata: %s\n\n" % (item.event_id.encode(), item.envelope())
                for item in batch
                if flt.everything or flt.matches(item)
            )
            if chunk:
                yield chunk
    except StreamError as exc:
        yield _frame("error", {"code": exc.code, "message": str(exc)})
        return
    yield _frame("end", {"lastEventId": last or ""})


def _response(state: AppState, topic: Topic, start: Start, flt: Filter) -> Response:
    return EventSourceResponse(
        _frames(state, topic, start, flt),
        ping=state.settings.ping_interval_s,
        send_timeout=state.settings.send_timeout_s,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


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
    return _response(state, Topic("trace", trace_id), Start(event_id=last or None), flt)


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
    start = Start(event_id=last) if last else Start(seq=body.since)
    return _response(state, Topic("thread", thread_id), start, flt)
