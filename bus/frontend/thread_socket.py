"""The WebSocket at ``/threads/{thread_id}/stream/events``, as LangGraph's SDKs use it.

Every frame the client sends is a protocol command (``{"id", "method",
"params"}``) and gets a ``CommandResponse`` / ``ErrorResponse`` with that id.
The socket carries one ordered stream of the thread; each
``subscription.subscribe`` gets the history matching its filter (from the
start, or from its ``since``), then the live events. A subscription that comes
later gets the history it missed replayed first, so an event may reach the
client twice (once per subscription that asked for it) with the same
``event_id``: the SDKs keep one, which is also what makes a reconnect's replay
harmless. ``subscription.reconnect`` restores subscriptions from their ids
after ``last_event_id``. Other commands are answered as on
``POST /threads/{thread_id}/commands``.

Close codes: a refused token ends the socket with 4000 + the HTTP status
(4401, 4403), which the SDKs treat as final; the others are those of
:mod:`bus.frontend.socket_session` (1011, 1012, 1013: the SDKs reconnect and
re-subscribe), each after an ``ErrorResponse`` with ``id: null`` that says why.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.websockets import WebSocket

from bus.errors import AccessDenied, StreamError
from bus.frontend.commands import (
    Command,
    CommandError,
    ReconnectParams,
    SubscribeParams,
    UnsubscribeParams,
    build_filter,
    dispatch,
    failure,
    params_of,
    subscription_filter,
    subscription_id,
)
from bus.frontend.filters import Filter
from bus.frontend.follow import REPLAY_PAGE, Start, follow_batches, resolve
from bus.frontend.socket_session import SocketSession
from bus.frontend.state import AppState
from bus.frontend.threads import error_code, find_topic, readable_kinds
from bus.history import Topic, TopicKind, read_after


class ThreadSession(SocketSession):
    """One client's socket: one ordered stream of the thread, filtered by its subscriptions.

    The stream follows the thread in order and sends each event matching any
    subscription. A subscription that arrives once the stream is under way first
    gets the history it missed (up to where the stream is) replayed, under the
    same lock that sends the stream's batches, so it misses nothing and the
    events after it come in order.
    """

    pump_name = "lcbus-thread-ws"

    def __init__(
        self, ws: WebSocket, state: AppState, thread_id: str, kinds: frozenset[TopicKind]
    ) -> None:
        super().__init__(ws, state)
        self.thread_id = thread_id
        self.kinds = kinds
        self.topic: Topic | None = None
        self.cursor: str | None = None
        """The id of the last event the stream passed (sent or filtered out)."""
        self._lock = asyncio.Lock()
        self._after_reply: list[tuple[str, Filter, Start]] = []

    async def after_reply(self) -> None:
        # Events follow the reply, so the subscription id arrives before them.
        for sub_id, flt, start in self._after_reply:
            await self._add(sub_id, flt, start)
        self._after_reply.clear()

    async def dispatch(self, command: Command) -> dict[str, Any]:
        if command.method == "subscription.subscribe":
            params = params_of(command, SubscribeParams)
            sub_id = subscription_id(params)
            self._after_reply.append((sub_id, build_filter(params), params.start()))
            return {"subscription_id": sub_id}
        if command.method == "subscription.unsubscribe":
            sub_id = params_of(command, UnsubscribeParams).subscription_id
            # No lock: the stream reads the filters once per batch, and a reply that
            # waited for a batch to go out would leave the command in flight longer.
            if self.filters.pop(sub_id, None) is None:
                raise CommandError("no_such_subscription", f"no subscription {sub_id}")
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
        await self.stop_pump()
        self.filters = filters
        self.start_pump(start)
        return {"restored": True}

    async def _add(self, sub_id: str, flt: Filter, start: Start) -> None:
        if self.pump is None:
            self.filters[sub_id] = flt
            self.start_pump(start)
            return
        async with self._lock:
            try:
                await self._replay(flt, start)
            except StreamError as exc:
                await self.send(failure(None, error_code(exc), f"{exc.code}: {exc}"))
                return
            self.filters[sub_id] = flt

    async def _replay(self, flt: Filter, start: Start) -> None:
        """The events from ``start`` up to the stream's cursor that match ``flt``."""
        topic, upto = self.topic, self.cursor
        if topic is None or upto is None:
            return  # the stream has passed nothing yet: it will deliver everything
        state = self.state
        after = (await resolve(state.redis, state.keys, topic, start)).event_id
        last = _order(upto)
        while True:
            page = await read_after(state.redis, state.keys, topic, after, count=REPLAY_PAGE)
            for item in page:
                if _order(item.event_id) > last:
                    return
                if flt.matches(item):
                    await self.send(item.envelope())
            if not page:
                return
            after = page[-1].event_id

    def stream_error_code(self, exc: StreamError) -> str:
        return error_code(exc)

    def stopped(self) -> None:
        self.topic = self.cursor = None

    async def stream(self, start: Start) -> None:
        # A thread's stream never ends, and a trace read as a thread keeps its
        # socket open after its end too: the client closes it.
        state = self.state
        self.topic = await find_topic(state, self.thread_id, self.kinds)
        if self.topic is None:  # not reached: find_topic waits until there is one
            return
        stream = follow_batches(state.hub, state.redis, state.keys, self.topic, start)
        async for batch in stream:
            async with self._lock:
                filters = list(self.filters.values())
                for item in batch:
                    if any(f.matches(item) for f in filters):
                        await self.send(item.envelope())
                self.cursor = batch[-1].event_id


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


async def thread_events_socket(ws: WebSocket) -> None:
    """``WS /threads/{thread_id}/stream/events``."""
    state: AppState = ws.app.state.bus
    thread_id = ws.path_params["thread_id"]
    await ws.accept()
    try:
        kinds = readable_kinds(ws, state, thread_id)
    except AccessDenied as exc:
        # Closed after the handshake, with the status in the code: a browser cannot
        # read a refused upgrade's status, and the SDKs end for good on 4xxx.
        await ws.send_text(failure(None, "permission_denied", exc.reason).decode())
        await ws.close(4000 + exc.status, exc.reason)
        return
    await ThreadSession(ws, state, thread_id, kinds).run()
