"""``POST /threads/{thread_id}/commands``: the protocol's commands that make sense for a bus.

- ``subscription.subscribe`` / ``.unsubscribe`` / ``.reconnect``: answered
  without server state (a subscription id encodes its filter, so any frontend
  process can restore it); over SSE the stream request itself carries the
  filter, and the WebSocket session (:mod:`bus.frontend.thread_socket`) runs
  them for real.
- ``agent.getTree``: the agent tree of a run (``run_id``, default the
  thread's latest run), from the trace worker's run trees.
- Commands only an agent server can carry out (``run.start``,
  ``input.respond``, ``input.inject``, ``state.*``) get the protocol's error
  response ``not_supported`` with the reason: the app runs its own chains.

Replies are the protocol's ``CommandResponse`` / ``ErrorResponse``, with HTTP 200.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from bus.errors import AccessDenied, StreamError
from bus.frontend.filters import Filter, FilterError
from bus.frontend.follow import Start, resolve
from bus.frontend.state import AppState
from bus.frontend.threads import find_topic, readable_kinds, refusal
from bus.history import Topic, TopicKind
from bus.keys import HISTORY_CHANNEL, HISTORY_PAYLOAD
from bus.traces.api import thread_agent_tree

AGENT_SERVER_ONLY = frozenset(
    {"run.start", "input.respond", "input.inject", "state.get", "state.listCheckpoints"}
    | {"state.fork"}
)
LATEST_RUN_SCAN = 1000
"""Newest history entries searched for a thread's latest run."""


class Command(msgspec.Struct):
    id: int
    method: str
    params: dict[str, Any] = {}


class FilterParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a subscription id encodes: the protocol's ``SubscribeParams``."""

    channels: list[str]
    namespaces: list[list[str]] | None = None
    depth: int | None = None


class SubscribeParams(FilterParams, forbid_unknown_fields=True, omit_defaults=True):
    """``SubscribeParams``, and where to start: the Python SDK re-subscribes with
    ``since`` (a sequence number); ``since_event_id`` is the durable cursor."""

    since: int | None = None
    since_event_id: str | None = None

    def start(self) -> Start:
        if self.since_event_id:
            return Start(event_id=self.since_event_id)
        return Start(seq=self.since)


class UnsubscribeParams(msgspec.Struct):
    subscription_id: str


class ReconnectParams(msgspec.Struct):
    run_id: str = ""
    last_event_id: str | None = None
    subscriptions: list[str] = []


class GetTreeParams(msgspec.Struct):
    run_id: str | None = None


class CommandError(Exception):
    """A command that fails with the protocol error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_encode = msgspec.json.Encoder().encode
_decode_command = msgspec.json.Decoder(Command).decode


def decode_command(text: str | bytes) -> Command:
    try:
        return _decode_command(text)
    except msgspec.DecodeError as exc:
        raise CommandError("invalid_argument", f"not a protocol command: {exc}") from None


T = TypeVar("T")


def params_of(command: Command, kind: type[T]) -> T:
    try:
        return msgspec.convert(command.params, kind)
    except msgspec.ValidationError as exc:
        raise CommandError("invalid_argument", f"{command.method}: {exc}") from None


def subscription_id(params: FilterParams) -> str:
    """``sub_<random>_<filter>``: the filter travels in the id; the random part keeps ids
    apart, also of equal filters and across reconnects (the JS SDK re-keys its
    subscriptions by the new ids one by one, so a new id must never equal an old one)."""
    filter_only = FilterParams(params.channels, params.namespaces, params.depth)
    blob = base64.urlsafe_b64encode(_encode(filter_only)).decode().rstrip("=")
    return f"sub_{secrets.token_hex(6)}_{blob}"


def subscription_filter(sub_id: str) -> Filter:
    """The filter a subscription id encodes; ``no_such_subscription`` when it is not ours."""
    blob = sub_id.split("_", 2)[-1]
    try:
        raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
        params = msgspec.json.decode(raw, type=FilterParams)
        return Filter.build(params.channels, params.namespaces, params.depth)
    except (ValueError, msgspec.DecodeError, FilterError):
        raise CommandError("no_such_subscription", f"not a subscription id: {sub_id}") from None


def build_filter(params: FilterParams) -> Filter:
    try:
        return Filter.build(params.channels, params.namespaces, params.depth)
    except FilterError as exc:
        raise CommandError("invalid_argument", str(exc)) from None


async def dispatch(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], command: Command
) -> dict[str, Any]:
    """The ``result`` of one command; :class:`CommandError` when it fails."""
    method = command.method
    if method == "subscription.subscribe":
        params = params_of(command, SubscribeParams)
        build_filter(params)
        return {"subscription_id": subscription_id(params)}
    if method == "subscription.unsubscribe":
        subscription_filter(params_of(command, UnsubscribeParams).subscription_id)
        return {}
    if method == "subscription.reconnect":
        return await _reconnect(state, thread_id, kinds, params_of(command, ReconnectParams))
    if method == "agent.getTree":
        return await _get_tree(state, thread_id, kinds, params_of(command, GetTreeParams))
    if method in AGENT_SERVER_ONLY:
        raise CommandError(
            "not_supported",
            f"{method} needs an agent server: lcbus streams the runs your app starts "
            "itself (start them in the app, with the bus callback handler attached)",
        )
    raise CommandError("unknown_command", f"unknown command {method!r}")


async def _reconnect(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], params: ReconnectParams
) -> dict[str, Any]:
    for sub_id in params.subscriptions:
        subscription_filter(sub_id)
    if params.last_event_id is None:
        return {"restored": True}
    topic = await find_topic(state, thread_id, kinds, wait=False)
    if topic is None:
        return {"restored": False}
    try:
        await resolve(state.redis, state.keys, topic, Start(event_id=params.last_event_id))
    except StreamError:
        return {"restored": False}
    return {"restored": True}


async def _get_tree(
    state: AppState, thread_id: str, kinds: frozenset[TopicKind], params: GetTreeParams
) -> dict[str, Any]:
    topic = await find_topic(state, thread_id, kinds, wait=False)
    if topic is None:
        raise CommandError("no_such_run", f"no run has streamed on {thread_id} yet")
    run_id = params.run_id or (thread_id if topic.kind == "trace" else None)
    if run_id is None:
        run_id = await latest_run(state, topic)
    on_thread = thread_id if topic.kind == "thread" else None
    if topic.kind == "trace" and run_id != thread_id:
        run_id = None  # a trace read as a thread has one run: itself
    tree = None
    if run_id:
        tree = await thread_agent_tree(state.redis, state.settings, run_id, thread_id=on_thread)
    if tree is None:
        raise CommandError("no_such_run", f"no run tree for run {run_id!r} on {thread_id}")
    return {"tree": tree}


async def latest_run(state: AppState, topic: Topic) -> str | None:
    """The run id of the newest root ``started`` lifecycle event in ``topic``'s history."""
    entries: Any = await state.redis.xrevrange(
        topic.history(state.keys), "+", "-", count=LATEST_RUN_SCAN
    )
    for _, fields in entries:
        if fields.get(HISTORY_CHANNEL) != b"lifecycle":
            continue
        params = json.loads(fields[HISTORY_PAYLOAD])["params"]
        run_id = params["data"].get("run_id")
        if not params["namespace"] and isinstance(run_id, str):
            return run_id
    return None


def success(command_id: int, result: dict[str, Any]) -> bytes:
    return _encode({"type": "success", "id": command_id, "result": result})


def failure(command_id: int | None, code: str, message: str) -> bytes:
    return _encode({"type": "error", "id": command_id, "error": code, "message": message})


async def commands(request: Request) -> Response:
    """``POST /threads/{thread_id}/commands`` with one protocol command."""
    state: AppState = request.app.state.bus
    thread_id = request.path_params["thread_id"]
    try:
        kinds = readable_kinds(request, state, thread_id)
    except AccessDenied as exc:
        return refusal(exc.status, "permission_denied", exc.reason)
    command_id: int | None = None
    try:
        command = decode_command(await request.body())
        command_id = command.id
        body = success(command.id, await dispatch(state, thread_id, kinds, command))
    except CommandError as exc:
        body = failure(command_id, exc.code, str(exc))
        if command_id is None:
            return Response(body, status_code=400, media_type="application/json")
    return Response(body, media_type="application/json")
