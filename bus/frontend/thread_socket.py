"""The WebSocket at ``/threads/{thread_id}/stream/events``, as LangGraph's SDKs use it.

Every frame the client sends is a protocol command (``{"id", "method",
"params"}``) and gets a ``CommandResponse`` / ``ErrorResponse`` with that id.
Each ``subscription.subscribe`` replays the thread's history matching its
filter, then follows it live, independently of the other subscriptions on the
socket: an event matching two subscriptions is sent twice with the same
``event_id``, and the SDKs keep one (they deduplicate by ``event_id``, which
is also how a reconnect's replay costs nothing twice). ``subscription.reconnect``
restores subscriptions from their ids after ``last_event_id``. Other commands
are answered as on ``POST /threads/{thread_id}/commands``.

Close codes: a refused token ends the socket with 4000 + the HTTP status
(4401, 4403), which the SDKs treat as final; 1013 when the client fell behind
and 1011 on another stream error (the SDKs reconnect and re-subscribe), each
after an ``ErrorResponse`` with ``id: null`` that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from bus.access import Denied
from bus.errors import SlowConsumer, StreamError
from bus.frontend.commands import (
    Command,
    CommandError,
    ReconnectParams,
    SubscribeParams,
    UnsubscribeParams,
    build_filter,
    decode_command,
    dispatch,
    failure,
    params_of,
    subscription_filter,
    subscription_id,
    success,
)
from bus.frontend.filters import Filter
from bus.frontend.follow import Start, resolve
from bus.frontend.state import AppState
from bus.frontend.threads import error_code, error_frame, find_topic, readable_kinds, thread_batches
from bus.history import TopicKind


class ThreadSession:
    """One client's socket: its subscriptions, each a task streaming to the socket."""

    def __init__(
        self, ws: WebSocket, state: AppState, thread_id: str, kinds: frozenset[TopicKind]
    ) -> None:
        self.ws = ws
        self.state = state
        self.thread_id = thread_id
        self.kinds = kinds
        self.pumps: dict[str, asyncio.Task[None]] = {}
        self._serial = 0
        self._starting: list[tuple[str, Filter, Start]] = []
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
        finally:
            for sub_id in list(self.pumps):
                await self._stop(sub_id)

    async def _on_message(self, text: str) -> None:
        try:
            command = decode_command(text)
        except CommandError as exc:
            await self.send(failure(None, exc.code, str(exc)))
            return
        try:
            result = await self._dispatch(command)
        except CommandError as exc:
            await self.send(failure(command.id, exc.code, str(exc)))
            return
        await self.send(success(command.id, result))
        # Streams start after the reply, so the subscription id arrives before its events.
        for sub_id, flt, start in self._starting:
            self.pumps[sub_id] = asyncio.create_task(self._pump(flt, start), name="lcbus-sub")
        self._starting.clear()

    async def _dispatch(self, command: Command) -> dict[str, Any]:
        if command.method == "subscription.subscribe":
            params = params_of(command, SubscribeParams)
            self._serial += 1
            sub_id = subscription_id(params, self._serial)
            self._starting.append((sub_id, build_filter(params), params.start()))
            return {"subscription_id": sub_id}
        if command.method == "subscription.unsubscribe":
            sub_id = params_of(command, UnsubscribeParams).subscription_id
            if sub_id not in self.pumps:
                raise CommandError("no_such_subscription", f"no subscription {sub_id}")
            await self._stop(sub_id)
            return {}
        if command.method == "subscription.reconnect":
            return await self._reconnect(params_of(command, ReconnectParams))
        return await dispatch(self.state, self.thread_id, self.kinds, command)

    async def _reconnect(self, params: ReconnectParams) -> dict[str, Any]:
        filters = {sub_id: subscription_filter(sub_id) for sub_id in params.subscriptions}
        start = Start(event_id=params.last_event_id)
        if start.resuming:
            topic = await find_topic(self.state, self.thread_id, self.kinds, wait=False)
            if topic is None:
                return {"restored": False}
            try:
                await resolve(self.state.redis, self.state.keys, topic, start)
            except StreamError:
                return {"restored": False}
        for sub_id in list(self.pumps):
            await self._stop(sub_id)
        self._starting += [(sub_id, flt, start) for sub_id, flt in filters.items()]
        return {"restored": True}

    async def _stop(self, sub_id: str) -> None:
        task = self.pumps.pop(sub_id, None)
        if task is None:
            return
        task.cancel()
        # A pump that already failed (the socket closed under it) has nothing left to say.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _pump(self, flt: Filter, start: Start) -> None:
        state = self.state
        try:
            async for batch in thread_batches(state, self.thread_id, self.kinds, start):
                for item in batch:
                    if flt.everything or flt.matches(item):
                        await self.send(item.envelope())
        except StreamError as exc:
            await self.send(error_frame(error_code(exc), f"{exc.code}: {exc}"))
            await self.ws.close(1013 if isinstance(exc, SlowConsumer) else 1011, exc.code)


async def thread_events_socket(ws: WebSocket) -> None:
    """``WS /threads/{thread_id}/stream/events``."""
    state: AppState = ws.app.state.bus
    thread_id = ws.path_params["thread_id"]
    await ws.accept()
    try:
        kinds = readable_kinds(ws, state, thread_id)
    except Denied as exc:
        # Closed after the handshake, with the status in the code: a browser cannot
        # read a refused upgrade's status, and the SDKs end for good on 4xxx.
        await ws.send_text(failure(None, "permission_denied", exc.reason).decode())
        await ws.close(4000 + exc.status, exc.reason)
        return
    await ThreadSession(ws, state, thread_id, kinds).run()
