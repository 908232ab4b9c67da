"""The HTTP response of an SSE stream: frames from an async iterator, straight to the ASGI send.

Written for the frontend rather than taken from sse-starlette, whose
``EventSourceResponse`` runs four tasks per stream (sender, ping, disconnect
and shutdown listeners, in an anyio task group) and a cancel scope per send:
measured on 1,000 streams behind a no-op ASGI send, it took 25 KiB per stream
and 21 us per chunk, against 4.6 KiB and 6.6 us here (``python -m
bench.clients`` holds 10,000 idle streams, and sends 20,000 chunks a second).
A stream here is the request's own task plus one that waits for the
disconnect; keep-alive pings and the send timeout are one timer per stream,
re-armed when it fires, not per frame.

- ``retry_ms``: the first chunk starts with a ``retry:`` field (how soon a
  browser's EventSource reconnects, say after a frontend restart), as a field
  of that frame, not as a data-less frame that a client parsing every frame's
  data would trip over.
- Pings: ``: ping`` comment frames once the stream has been silent for
  ``ping_s`` (proxies close idle connections; a dead peer shows on a write).
- The send timeout: a single send blocked longer than ``send_timeout_s``
  ends the stream.
- The client leaving (``http.disconnect``) ends the stream at once, wherever
  it waits (the frames' iterator is closed, so its subscription goes).
- Shutdown: :meth:`EventStreams.stop` ends the streams of the process.
- :meth:`EventStreamResponse.send_now` sends a chunk from outside the
  stream's task (the hub's read loop, for a live token), when nothing else is
  being sent and the connection's write buffer is empty: the server's
  ``send`` then completes without waiting, and the token skips a task wake-up
  and the trip through the stream's iterators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

PING = b": ping\n\n"

SEND_NOW_MAX_BYTES = 16 * 1024
"""Larger chunks go through the stream's task: one that fills the write buffer
would make the server's ``send`` wait for it to drain."""

SERVER_SEND_SCOPE_KEY = "lcbus.server_send"
"""The server's own ``send`` of the connection, as the app received it (see FrontendApp).

The body chunks of a stream go there, past the middleware's wrappers: those
(Starlette's error handlers, CORS) act on the response start only, and they
were three coroutine calls of every chunk, to every client.
"""

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    "Connection": "keep-alive",
}


class EventStreams:
    """The open streams of one process, so that a shutdown can end them."""

    def __init__(self) -> None:
        self._open: set[EventStreamResponse] = set()
        self.stopping = False

    def add(self, stream: EventStreamResponse) -> None:
        self._open.add(stream)

    def discard(self, stream: EventStreamResponse) -> None:
        self._open.discard(stream)

    def stop(self, *, graceful: bool) -> None:
        """End the open streams now: those that have no farewell of their own, or
        (``graceful``) every one still open. From now on a stream with no farewell
        ends as soon as it opens."""
        self.stopping = True
        for stream in list(self._open):
            if graceful or not stream.drains:
                stream.stop(SHUTDOWN)


SHUTDOWN = "server shutdown"
DISCONNECTED = "client disconnected"
SEND_TIMEOUT = "send timeout"
DONE = "done"


class EventStreamResponse(Response):
    """``text/event-stream`` of the chunks ``frames`` yields, one send each.

    ``drains``: the frames end by themselves when the process shuts down (with
    a farewell frame), so a shutdown stops the stream only after the grace
    period; otherwise at once. ``on_send_timeout`` is called when a send stays
    blocked past ``send_timeout_s`` (say, to abort the connection, whose bytes
    will never be taken).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        ping_s: float,
        send_timeout_s: float,
        streams: EventStreams | None = None,
        retry_ms: int | None = None,
        drains: bool = False,
        on_send_timeout: Callable[[], None] | None = None,
        headers: Mapping[str, str] | None = None,
        transport: asyncio.WriteTransport | None = None,
    ) -> None:
        # Not Response.__init__: it would add a content-length for an empty body.
        self.status_code = 200
        self.background = None
        self.init_headers({**_HEADERS, **(headers or {})})
        self._frames = frames
        self._first = b"" if retry_ms is None else b"retry: %d\n" % retry_ms
        self._ping_s = ping_s
        self._send_timeout_s = send_timeout_s
        self._streams = streams
        self.drains = drains
        self._on_send_timeout = on_send_timeout
        self._send: Send | None = None
        self._body_send: Send | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sending_since: float | None = None
        self._last_sent = 0.0
        self._pinging: asyncio.Future[None] | None = None  # held: the loop keeps weak refs
        """A send begun outside the stream's task (a ping, or a send_now that had to wait)."""
        self._transport = transport
        """The connection's transport, when the server exposes it: send_now needs it."""
        self._started = False
        """The response's start went out: body chunks may follow."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stopping = self._streams is not None and self._streams.stopping and not self.drains
        if scope["method"] == "HEAD" or stopping:
            # An endless body on HEAD would never complete: headers only. A stream with
            # no farewell of its own opened while the process shuts down ends at once.
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._send = send
        self._body_send = scope.get(SERVER_SEND_SCOPE_KEY, send)
        if self._streams is not None:
            self._streams.add(self)
        listener = asyncio.ensure_future(self._until_disconnect(receive))
        self._last_sent = loop.time()
        self._timer = loop.call_at(self._last_sent + self._ping_s, self._tick)
        try:
            await self._stream()
        finally:
            self._stopped = self._stopped or DONE  # nothing interrupts the cleanup
            if self._timer is not None:
                self._timer.cancel()
            listener.cancel()
            if self._streams is not None:
                self._streams.discard(self)
            self._task = self._timer = None  # no cycle left for the garbage collector
            self._send = self._body_send = None
            await self._close_frames()

    async def _stream(self) -> None:
        assert self._send is not None
        try:
            await self._send(
                {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
            )
            self._started = True
            async for chunk in self._frames:
                if self._first:
                    await self._write(self._first + chunk)
                    self._first = b""
                else:
                    await self._write(chunk)
            await self._write(b"", more_body=False)
        except asyncio.CancelledError:
            task = self._task
            if self._stopped is None or task is None or task.uncancel() > 0:
                raise  # cancelled from outside: the server gave up on the request
            log.debug("SSE stream stopped: %s", self._stopped)
            if self._stopped == SHUTDOWN:
                # Ended cleanly, not cut: a client reconnects (to any frontend) and resumes.
                with contextlib.suppress(OSError):
                    assert self._body_send is not None
                    await self._body_send(
                        {"type": "http.response.body", "body": b"", "more_body": False}
                    )
        except OSError:
            pass  # the connection is gone (servers of ASGI 2.4 raise on a send)

    async def _close_frames(self) -> None:
        aclose = getattr(self._frames, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    async def _write(self, chunk: bytes, *, more_body: bool = True) -> None:
        """One send at a time: a chunk waits for a ping still in its send (rare: a ping
        starts only while no chunk is being sent), and a ping gives way to a chunk."""
        assert self._body_send is not None
        pinging = self._pinging
        if pinging is not None and not pinging.done() and chunk is not PING:
            await asyncio.shield(pinging)
        loop = asyncio.get_running_loop()
        self._sending_since = loop.time()
        try:
            await self._body_send(
                {"type": "http.response.body", "body": chunk, "more_body": more_body}
            )
        finally:
            self._sending_since = None
            self._last_sent = loop.time()

    def send_now(self, chunk: bytes) -> bool:
        """Send ``chunk`` at once, from outside the stream's task; False when it cannot
        (something is being sent, the response has not started, the write buffer holds
        bytes, the chunk is large, the stream ended): the caller sends it the usual way.

        Called by the hub's read loop, so it never raises: a send that fails (the
        client left) returns False, and the stream's own next send meets the same end.
        """
        body_send = self._body_send
        transport = self._transport
        pinging = self._pinging
        if (
            body_send is None
            or transport is None
            or not self._started
            or self._first
            or self._stopped is not None
            or self._sending_since is not None
            or (pinging is not None and not pinging.done())
            or len(chunk) > SEND_NOW_MAX_BYTES
            or transport.get_write_buffer_size() > 0
        ):
            return False
        sending = body_send({"type": "http.response.body", "body": chunk, "more_body": True})
        try:
            waiting_on = sending.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            self._last_sent = asyncio.get_running_loop().time()
            return True
        except Exception:  # the connection is gone: the stream's task finds out itself
            return False
        # The server's send waits after all (say, for a transport that paused writing):
        # a task finishes it, the stream's next send waits for that task, and the send
        # timeout watches it like any send.
        self._sending_since = asyncio.get_running_loop().time()
        self._pinging = asyncio.ensure_future(self._finish_sending(sending, waiting_on))
        return True

    async def _finish_sending(self, sending: Any, waiting_on: Any) -> None:
        """Drive a send that :meth:`send_now` began, and that stopped to wait on
        ``waiting_on``, to its end, as a task would: resume it once what it waits on is
        done, whatever the outcome (the send reads the outcome itself)."""
        try:
            while True:
                if waiting_on is None:
                    await asyncio.sleep(0)
                else:
                    await asyncio.wait([waiting_on])
                try:
                    waiting_on = sending.send(None)
                except StopIteration:
                    return
        except asyncio.CancelledError:
            sending.close()
            raise
        except Exception:  # the connection failed mid-send: the stream's next send finds out
            return
        finally:
            self._sending_since = None
            self._last_sent = asyncio.get_running_loop().time()

    async def _until_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.stop(DISCONNECTED)

    def stop(self, reason: str) -> None:
        """End the stream wherever its task waits (once; not after it finished)."""
        if self._stopped is None and self._task is not None:
            self._stopped = reason
            self._task.cancel()

    def _tick(self) -> None:
        """The stream's one timer: a send stuck past its timeout ends the stream; a
        stream silent for ``ping_s`` gets a ping. Re-armed for the next deadline."""
        self._timer = None
        if self._stopped is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        since = self._sending_since
        if since is not None:
            if now - since >= self._send_timeout_s:
                log.info("ending an SSE stream whose send stayed blocked %.0f s", now - since)
                self.stop(SEND_TIMEOUT)
                if self._on_send_timeout is not None:
                    self._on_send_timeout()
                return
            self._timer = loop.call_at(since + self._send_timeout_s, self._tick)
            return
        due = self._last_sent + self._ping_s
        if now >= due:
            # Rare (a silent stream, once per interval): a task of its own sends it.
            self._pinging = asyncio.ensure_future(self._ping())
            due = now + self._ping_s
        self._timer = loop.call_at(due, self._tick)

    async def _ping(self) -> None:
        if self._sending_since is not None or self._stopped is not None:
            return  # a chunk went out since the timer fired: no ping needed, and none at once
        with contextlib.suppress(OSError):
            await self._write(PING)
