"""The WebSocket session at ``/threads/{thread_id}/stream``.

Commands are the protocol's ``subscription.subscribe`` / ``.unsubscribe`` /
``.reconnect`` (``{"id", "method", "params"}``); replies are its
``CommandResponse`` / ``ErrorResponse``. A session is one ordered stream of
the thread's events with one cursor; subscriptions are filters on it, so an
event matching several subscriptions is sent once, and one ``last_event_id``
is enough to resume. The first subscribe starts the stream at the head of
history; later ones filter from where the stream is.

A subscription id encodes its filter, so ``subscription.reconnect`` on a new
connection (to any frontend process) restores subscriptions without server
state. ``restored: false`` means the session could not resume without a gap
(the position left history, or a subscription id is not ours): nothing is
streaming then, and the client starts over with ``subscription.subscribe``.

The stream closes with code 1000 after the thread's final event, 1013
(reason ``slow_consumer``) when the client falls behind, 1013 (reason
``unavailable``) when Redis does not answer (reconnecting later resumes),
1012 when the frontend shuts down, 1011 on another stream error, after an
``ErrorResponse`` with ``id: null`` that says why. A ``last_event_id`` that
is not an event id at all is an ``invalid_argument`` error to that command.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

import msgspec
from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from bus.access import check_access, error_response
from bus.errors import AccessDenied, ServerDraining, SlowConsumer, StreamError
from bus.frontend.filters import Filter, FilterError, any_match
from bus.frontend.follow import Start, follow, resolve
from bus.frontend.state import AppState
from bus.history import Topic, is_event_id


class _Command(msgspec.Struct):
    id: int
    method: str
    params: dict[str, Any] = {}


class _SubscribeParams(msgspec.Struct, forbid_unknown_fields=True):
    channels: list[str]
    namespaces: list[list[str]] | None = None
    depth: int | None = None


class _UnsubscribeParams(msgspec.Struct):
    subscription_id: str


class _ReconnectParams(msgspec.Struct):
    run_id: str  # the session's topic is the URL's thread; accepted for protocol parity
    last_event_id: str | None = None
    subscriptions: list[str] = []


_encode = msgspec.json.Encoder().encode


class CommandError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def subscription_id(params: _SubscribeParams) -> str:
    return "sub_" + base64.urlsafe_b64encode(_encode(params)).decode().rstrip("=")


def _filter_of(sub_id: str) -> Filter:
    try:
        raw = base64.urlsafe_b64decode(sub_id.removeprefix("sub_") + "=" * (-len(sub_id) % 4))
        params = msgspec.json.decode(raw, type=_SubscribeParams)
        return Filter.build(params.channels, params.namespaces, params.depth)
    except (ValueError, msgspec.DecodeError, FilterError):
        raise CommandError("no_such_subscription", f"not a subscription id: {sub_id}") from None


class Session:
    def __init__(self, ws: WebSocket, state: AppState, topic: Topic) -> None:
        self.ws = ws
        self.state = state
        self.topic = topic
        self.filters: dict[str, Filter] = {}
        self.pump: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, body: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_text(body.decode())

    async def run(self) -> None:
        try:
            while True:
                await self._on_message(await self.ws.receive_text())
        except WebSocketDisconnect:
            pass
        except (RedisError, OSError) as exc:
            # Redis failed under a command: say so and close with a frame, never just drop.
            await self._stop_pump()
            with contextlib.suppress(Exception):
                await self._error(None, "unavailable", f"Redis is unavailable: {exc}")
                await self.ws.close(1013, "unavailable")
        finally:
            await self._stop_pump()

    async def _on_message(self, text: str) -> None:
        try:
            command = msgspec.json.decode(text, type=_Command)
        except msgspec.DecodeError as exc:
            await self._error(None, "invalid_argument", f"not a command: {exc}")
            return
        try:
            result = await self._dispatch(command)
        except CommandError as exc:
            await self._error(command.id, exc.code, str(exc))
            return
        await self.send(_encode({"type": "success", "id": command.id, "result": result}))

    async def _dispatch(self, command: _Command) -> dict[str, Any]:
        try:
            if command.method == "subscription.subscribe":
                return self._subscribe(msgspec.convert(command.params, _SubscribeParams))
            if command.method == "subscription.unsubscribe":
                return self._unsubscribe(msgspec.convert(command.params, _UnsubscribeParams))
            if command.method == "subscription.reconnect":
                return await self._reconnect(msgspec.convert(command.params, _ReconnectParams))
        except (msgspec.ValidationError, FilterError) as exc:
            raise CommandError("invalid_argument", str(exc)) from None
        raise CommandError("unknown_command", f"unsupported command {command.method!r}")

    def _subscribe(self, params: _SubscribeParams) -> dict[str, Any]:
        flt = Filter.build(params.channels, params.namespaces, params.depth)
        sub_id = subscription_id(params)
        self.filters[sub_id] = flt
        if self.pump is None:
            self._start(Start())
        return {"subscription_id": sub_id}

    def _unsubscribe(self, params: _UnsubscribeParams) -> dict[str, Any]:
        if self.filters.pop(params.subscription_id, None) is None:
            raise CommandError("no_such_subscription", f"no subscription {params.subscription_id}")
        return {}

    async def _reconnect(self, params: _ReconnectParams) -> dict[str, Any]:
        last = params.last_event_id
        if last is not None and not is_event_id(last):
            raise CommandError("invalid_argument", f"last_event_id {last!r} is not an event id")
        start = Start(event_id=last)
        try:
            filters = {sub_id: _filter_of(sub_id) for sub_id in params.subscriptions}
            async with self.state.hub.history_reads.slots:
                await resolve(self.state.redis, self.state.keys, self.topic, start)
        except (CommandError, StreamError):
            return {"restored": False}
        await self._stop_pump()
        self.filters = filters
        self._start(start)
        return {"restored": True}

    async def _stop_pump(self) -> None:
        if self.pump is None:
            return
        self.pump.cancel()
        # A pump that already failed (the socket closed under it) has nothing left to say.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.pump
        self.pump = None

    def _start(self, start: Start) -> None:
        self.pump = asyncio.create_task(self._stream(start), name="lcbus-ws-pump")

    async def _stream(self, start: Start) -> None:
        state = self.state
        try:
            async for item in follow(state.hub, state.redis, state.keys, self.topic, start):
                if any_match(list(self.filters.values()), item):
                    await self.send(item.envelope())
        except ServerDraining as exc:
            await self._error(None, "unknown_error", f"{exc.code}: {exc}")
            await self.ws.close(1012, exc.code)
            return
        except StreamError as exc:
            await self._error(None, "unknown_error", f"{exc.code}: {exc}")
            await self.ws.close(1013 if isinstance(exc, SlowConsumer) else 1011, exc.code)
            return
        except (RedisError, OSError) as exc:
            await self._error(None, "unavailable", f"Redis is unavailable: {exc}")
            await self.ws.close(1013, "unavailable")
            return
        await self.ws.close(1000, "end")

    async def _error(self, command_id: int | None, code: str, message: str) -> None:
        body = {"type": "error", "id": command_id, "error": code, "message": message}
        await self.send(_encode(body))


async def thread_socket(ws: WebSocket) -> None:
    state: AppState = ws.app.state.bus
    thread_id = ws.path_params["thread_id"]
    try:
        check_access(ws, state.settings, thread_id=thread_id)
    except AccessDenied as exc:
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            await ws.send_denial_response(error_response(exc.status, exc.reason))
        else:
            await ws.close(1008, exc.reason)
        return
    await ws.accept()
    await Session(ws, state, Topic("thread", thread_id)).run()
