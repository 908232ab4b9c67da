"""What both WebSocket sessions share: one ordered stream per socket, and how it ends.

A session reads the client's commands in :meth:`SocketSession.run` and runs
one pump task that follows the topic. Every way a stream can stop ends with a
protocol ``ErrorResponse`` (``id: null``) saying why, then a close frame, never
a dropped connection:

- 1012 when the frontend shuts down (``server_shutdown``);
- 1013 when the client fell behind (``slow_consumer``) or Redis did not answer
  (``unavailable``): reconnecting later resumes;
- 1011 on another stream error.

Redis can fail under a command as well as under the pump (a reconnect resolves
its position in history): :meth:`SocketSession.run` closes the same way then.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from bus.errors import ServerDraining, SlowConsumer, StreamError
from bus.frontend.commands import Command, CommandError, decode_command, failure, success
from bus.frontend.filters import Filter
from bus.frontend.follow import Start
from bus.frontend.state import AppState


def close_code(exc: StreamError) -> int:
    if isinstance(exc, ServerDraining):
        return 1012
    return 1013 if isinstance(exc, SlowConsumer) else 1011


class SocketSession:
    """The socket, its subscriptions' filters and the pump; subclasses answer commands."""

    pump_name = "lcbus-ws-pump"

    def __init__(self, ws: WebSocket, state: AppState) -> None:
        self.ws = ws
        self.state = state
        self.filters: dict[str, Filter] = {}
        self.pump: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, body: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_text(body.decode())

    async def run(self) -> None:
        try:
            while True:
                await self.on_message(await self.ws.receive_text())
        except WebSocketDisconnect:
            pass
        except (RedisError, OSError) as exc:
            await self.stop_pump()
            # The socket may be gone too; then there is no one left to tell.
            with contextlib.suppress(Exception):
                await self._close_unavailable(exc)
        finally:
            await self.stop_pump()

    async def on_message(self, text: str) -> None:
        """Answer one command frame with the protocol's reply, then :meth:`after_reply`."""
        try:
            command = decode_command(text)
        except CommandError as exc:
            await self.send(failure(None, exc.code, str(exc)))
            return
        try:
            result = await self.dispatch(command)
        except CommandError as exc:
            await self.send(failure(command.id, exc.code, str(exc)))
            return
        await self.send(success(command.id, result))
        await self.after_reply()

    async def dispatch(self, command: Command) -> dict[str, Any]:
        """The ``result`` of one command; :class:`CommandError` when it fails."""
        raise NotImplementedError

    async def after_reply(self) -> None:
        """What a command sends after its reply (a new subscription's history)."""

    async def stream(self, start: Start) -> None:
        """Send the topic's events from ``start`` on (and close, if the session ends then)."""
        raise NotImplementedError

    def stream_error_code(self, exc: StreamError) -> str:
        """The protocol error code that tells the client why the stream stopped."""
        return "unknown_error"

    def stopped(self) -> None:
        """Called once the pump has ended; a subclass drops what described it."""

    def start_pump(self, start: Start) -> None:
        self.pump = asyncio.create_task(self._pump(start), name=self.pump_name)

    async def stop_pump(self) -> None:
        if self.pump is None:
            return
        self.pump.cancel()
        # A pump that already failed (the socket closed under it) has nothing left to say.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.pump
        self.pump = None
        self.stopped()

    async def _pump(self, start: Start) -> None:
        try:
            await self.stream(start)
        except StreamError as exc:
            await self.send(failure(None, self.stream_error_code(exc), f"{exc.code}: {exc}"))
            await self.ws.close(close_code(exc), exc.code)
            return
        except (RedisError, OSError) as exc:
            await self._close_unavailable(exc)

    async def _close_unavailable(self, exc: Exception) -> None:
        await self.send(failure(None, "unavailable", f"Redis is unavailable: {exc}"))
        await self.ws.close(1013, "unavailable")
