"""The frontend's SSE response against an ASGI server of its own: pings, the client
leaving, a send that never returns, shutdown, HEAD, the first chunk's retry hint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from bus.frontend.event_stream import (
    PING,
    SERVER_SEND_SCOPE_KEY,
    EventStreamResponse,
    EventStreams,
)
from tests.support.waiting import wait_until_async


class _Server:
    """One connection's ASGI side: what was sent, and a disconnect on demand."""

    def __init__(self, *, method: str = "GET") -> None:
        self.scope = {"type": "http", "method": method}
        self.messages: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.blocked = asyncio.Event()  # set: every body send blocks forever

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and self.blocked.is_set():
            await asyncio.Event().wait()
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages)

    @property
    def complete(self) -> bool:
        return any(m.get("more_body") is False for m in self.messages)


class _Frames:
    """An endless stream of frames, put by the test; knows whether it was closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed = False

    async def frames(self) -> AsyncIterator[bytes]:
        try:
            while True:
                yield await self.queue.get()
        finally:
            self.closed = True


def _start(response: EventStreamResponse, server: _Server) -> asyncio.Task[None]:
    return asyncio.ensure_future(response(server.scope, server.receive, server.send))


async def test_frames_go_out_with_the_retry_hint_first_and_pings_when_silent() -> None:
    server, source = _Server(), _Frames()
    response = EventStreamResponse(source.frames(), ping_s=0.05, send_timeout_s=5, retry_ms=1000)
    task = _start(response, server)
    source.queue.put_nowait(b"data: 1\n\n")
    source.queue.put_nowait(b"data: 2\n\n")
    await wait_until_async(lambda: server.body.count(PING) >= 2, within=10, what="pings")
    assert server.body.startswith(b"retry: 1000\ndata: 1\n\ndata: 2\n\n")
    start = server.messages[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert not any(name == b"content-length" for name, _ in start["headers"])
    server.gone.set()
    await task


async def test_the_client_leaving_ends_the_stream_and_closes_its_frames() -> None:
    server, source = _Server(), _Frames()
    task = _start(EventStreamResponse(source.frames(), ping_s=30, send_timeout_s=5), server)
    source.queue.put_nowait(b"data: 1\n\n")
    await wait_until_async(lambda: b"data: 1" in server.body, within=10, what="the frame")
    server.gone.set()
    await task  # returns normally: nothing for the server to log
    assert source.closed and not server.complete


async def test_a_send_that_never_returns_ends_the_stream_after_the_send_timeout() -> None:
    server, source = _Server(), _Frames()
    timed_out: list[bool] = []
    response = EventStreamResponse(
        source.frames(),
        ping_s=0.05,
        send_timeout_s=0.2,
        on_send_timeout=lambda: timed_out.append(True),
    )
    task = _start(response, server)
    server.blocked.set()
    source.queue.put_nowait(b"data: stuck\n\n")
    await task
    assert timed_out == [True] and source.closed


async def test_shutdown_ends_streams_without_a_farewell_at_once_and_the_others_later() -> None:
    streams = EventStreams()
    plain, draining = _Server(), _Server()
    plain_frames, draining_frames = _Frames(), _Frames()
    plain_task = _start(
        EventStreamResponse(plain_frames.frames(), ping_s=30, send_timeout_s=5, streams=streams),
        plain,
    )
    draining_task = _start(
        EventStreamResponse(
            draining_frames.frames(), ping_s=30, send_timeout_s=5, streams=streams, drains=True
        ),
        draining,
    )
    await wait_until_async(
        lambda: plain.messages and draining.messages, within=10, what="both streams open"
    )
    streams.stop(graceful=False)
    await plain_task
    assert plain.complete and plain_frames.closed  # a clean end, not a cut
    assert not draining_task.done()
    # A stream with no farewell opened from now on ends at once.
    late = _Server()
    await _start(
        EventStreamResponse(_Frames().frames(), ping_s=30, send_timeout_s=5, streams=streams), late
    )
    assert late.complete and late.body == b""
    streams.stop(graceful=True)
    await draining_task
    assert draining.complete and draining_frames.closed


async def test_head_gets_the_headers_and_no_stream() -> None:
    server, source = _Server(method="HEAD"), _Frames()
    await _start(EventStreamResponse(source.frames(), ping_s=30, send_timeout_s=5), server)
    assert server.messages[0]["status"] == 200 and server.complete and server.body == b""
    assert not source.closed  # never iterated


async def test_body_chunks_go_to_the_servers_own_send_past_the_middleware() -> None:
    server, source = _Server(), _Frames()
    wrapped: list[str] = []

    async def middleware_send(message: dict[str, Any]) -> None:
        wrapped.append(message["type"])
        await server.send(message)

    scope = {**server.scope, SERVER_SEND_SCOPE_KEY: server.send}
    response = EventStreamResponse(source.frames(), ping_s=30, send_timeout_s=5)
    task = asyncio.ensure_future(response(scope, server.receive, middleware_send))
    source.queue.put_nowait(b"data: 1\n\n")
    await wait_until_async(lambda: b"data: 1" in server.body, within=10, what="the frame")
    assert wrapped == ["http.response.start"]
    server.gone.set()
    await task


class _HoldingSend:
    """An ASGI send that holds ``held`` until ``release`` is set, noting each send that
    began while another was under way. ``written_first``: the body is recorded before
    the wait, else after it (servers do either)."""

    def __init__(self, server: _Server, held: bytes, *, written_first: bool) -> None:
        self.server, self.held, self.written_first = server, held, written_first
        self.release = asyncio.Event()
        self.in_send: list[bytes] = []
        self.overlapped: list[bool] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        body = message.get("body", b"")
        self.overlapped.append(bool(self.in_send))
        self.in_send.append(body)
        try:
            if self.written_first:
                self.server.messages.append(message)
            if body == self.held:
                await self.release.wait()
            if not self.written_first:
                await self.server.send(message)
        finally:
            self.in_send.remove(body)


async def test_a_chunk_waits_for_a_ping_still_in_its_send() -> None:
    server, source = _Server(), _Frames()
    send = _HoldingSend(server, PING, written_first=False)
    response = EventStreamResponse(source.frames(), ping_s=0.05, send_timeout_s=5)
    task = asyncio.ensure_future(response(server.scope, server.receive, send))
    await wait_until_async(lambda: PING in send.in_send, within=10, what="a ping in its send")
    source.queue.put_nowait(b"data: 1\n\n")
    await asyncio.sleep(0.1)
    assert b"data: 1" not in server.body
    send.release.set()
    await wait_until_async(lambda: b"data: 1" in server.body, within=10, what="the frame")
    assert not any(send.overlapped)
    assert server.body.index(PING) < server.body.index(b"data: 1")
    server.gone.set()
    await task


class _Transport:
    """What send_now reads of a connection: how many bytes wait in its write buffer."""

    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


async def _streaming(
    server: _Server, source: _Frames, transport: _Transport, send: Any = None
) -> tuple[EventStreamResponse, asyncio.Task[None]]:
    """A response whose first chunk went out, so that send_now may be used."""
    response = EventStreamResponse(
        source.frames(),
        ping_s=60,
        send_timeout_s=5,
        retry_ms=1000,
        transport=transport,  # type: ignore[arg-type]
    )
    task = asyncio.ensure_future(response(server.scope, server.receive, send or server.send))
    source.queue.put_nowait(b"data: first\n\n")
    await wait_until_async(lambda: b"data: first" in server.body, within=10, what="first")
    return response, task


async def test_send_now_sends_at_once_only_while_nothing_else_is_sent() -> None:
    server, source, transport = _Server(), _Frames(), _Transport()
    fresh = EventStreamResponse(source.frames(), ping_s=60, send_timeout_s=5, retry_ms=1000)
    assert not fresh.send_now(b"data: early\n\n")  # not started: no transport, no start
    response, task = await _streaming(server, source, transport)

    assert response.send_now(b"data: 1\n\n")  # done before it returns: no task ran
    assert server.body.endswith(b"data: 1\n\n")
    transport.buffered = 10  # the client has not taken everything yet
    assert not response.send_now(b"data: 2\n\n")
    transport.buffered = 0
    assert not response.send_now(b"x" * (64 * 1024))  # large: the stream's own send
    assert response.send_now(b"data: 2\n\n")
    server.gone.set()
    await task
    assert not response.send_now(b"data: 3\n\n")  # the stream ended
    assert server.body.count(b"data: 2") == 1 and b"data: 3" not in server.body


async def test_a_send_now_that_has_to_wait_holds_back_the_streams_next_chunk() -> None:
    server, source, transport = _Server(), _Frames(), _Transport()
    send = _HoldingSend(server, b"data: waits\n\n", written_first=True)
    response, task = await _streaming(server, source, transport, send)
    assert response.send_now(b"data: waits\n\n")
    assert not response.send_now(b"data: refused\n\n")  # the first is still in its send
    source.queue.put_nowait(b"data: next\n\n")
    await asyncio.sleep(0.1)
    assert b"data: next" not in server.body
    send.release.set()
    await wait_until_async(lambda: b"data: next" in server.body, within=10, what="next")
    assert server.body.index(b"data: waits") < server.body.index(b"data: next")
    assert not any(send.overlapped) and b"refused" not in server.body
    server.gone.set()
    await task


async def test_a_send_now_that_fails_says_so() -> None:
    server, source, transport = _Server(), _Frames(), _Transport()
    failing = False

    async def send(message: dict[str, Any]) -> None:
        if failing and message.get("body"):
            raise OSError("the client is gone")
        await server.send(message)

    response, task = await _streaming(server, source, transport, send)
    failing = True
    assert not response.send_now(b"data: 1\n\n")
    server.gone.set()
    await task
