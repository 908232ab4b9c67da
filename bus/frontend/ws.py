"""The WebSocket session at ``/threads/{thread_id}/stream``.

Commands are the protocol's ``subscription.subscribe`` / ``.unsubscribe`` /
``.reconnect`` (``{"id", "method", "params"}``); replies are its
``CommandResponse`` / ``ErrorResponse``. A session is one ordered stream of
the thread's events with one cursor; subscriptions are filters on it, so an
event matching several subscriptions is sent once, and one ``last_event_id``
is enough to resume. The first subscribe starts the stream at the head of
history; later ones filter from where the stream is.

A subscription id encodes its filter (as on ``POST /threads/{id}/commands``),
so ``subscription.reconnect`` on a new connection (to any frontend process)
restores subscriptions without server state. ``restored: false`` means the
session could not resume without a gap (the position left history, or a
subscription id is not ours): nothing is streaming then, and the client starts
over with ``subscription.subscribe``.

The stream closes with code 1000 after the thread's final event, and
otherwise as :mod:`bus.frontend.socket_session` says, after an
``ErrorResponse`` with ``id: null`` that says why. A ``last_event_id`` that
is not an event id at all is an ``invalid_argument`` error to that command.
"""

from __future__ import annotations

from typing import Any

from starlette.websockets import WebSocket

from bus.access import check_access, error_response
from bus.errors import AccessDenied, StreamError
from bus.frontend.commands import (
    Command,
    CommandError,
    FilterParams,
    ReconnectParams,
    UnsubscribeParams,
    build_filter,
    params_of,
    subscription_filter,
    subscription_id,
)
from bus.frontend.filters import any_match
from bus.frontend.follow import Start, follow, resolve
from bus.frontend.socket_session import SocketSession
from bus.frontend.state import AppState
from bus.history import Topic, is_event_id


class Session(SocketSession):
    def __init__(self, ws: WebSocket, state: AppState, topic: Topic) -> None:
        super().__init__(ws, state)
        self.topic = topic

    async def dispatch(self, command: Command) -> dict[str, Any]:
        if command.method == "subscription.subscribe":
            return self._subscribe(params_of(command, FilterParams))
        if command.method == "subscription.unsubscribe":
            return self._unsubscribe(params_of(command, UnsubscribeParams))
        if command.method == "subscription.reconnect":
            return await self._reconnect(params_of(command, ReconnectParams))
        raise CommandError("unknown_command", f"unsupported command {command.method!r}")

    def _subscribe(self, params: FilterParams) -> dict[str, Any]:
        flt = build_filter(params)
        sub_id = subscription_id(params)
        self.filters[sub_id] = flt
        if self.pump is None:
            self.start_pump(Start())
        return {"subscription_id": sub_id}

    def _unsubscribe(self, params: UnsubscribeParams) -> dict[str, Any]:
        if self.filters.pop(params.subscription_id, None) is None:
            raise CommandError("no_such_subscription", f"no subscription {params.subscription_id}")
        return {}

    async def _reconnect(self, params: ReconnectParams) -> dict[str, Any]:
        last = params.last_event_id
        if last is not None and not is_event_id(last):
            raise CommandError("invalid_argument", f"last_event_id {last!r} is not an event id")
        start = Start(event_id=last)
        try:
            filters = {sub_id: subscription_filter(sub_id) for sub_id in params.subscriptions}
            async with self.state.hub.history_reads.slots:
                await resolve(self.state.redis, self.state.keys, self.topic, start)
        except (CommandError, StreamError):
            return {"restored": False}
        await self.stop_pump()
        self.filters = filters
        self.start_pump(start)
        return {"restored": True}

    async def stream(self, start: Start) -> None:
        state = self.state
        async for item in follow(state.hub, state.redis, state.keys, self.topic, start):
            if any_match(list(self.filters.values()), item):
                await self.send(item.envelope())
        await self.ws.close(1000, "end")


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
