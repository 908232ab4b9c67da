"""HTTP read API of run trees: ``GET /traces`` and ``GET /traces/{trace_id}``.

Bodies are the JSON of the :mod:`bus.traces.tree` schema (:class:`~bus.traces.tree.Trace`
for one trace, :class:`~bus.traces.queries.TracePage` of
:class:`~bus.traces.tree.TraceSummary` for the list), the same Structs the Python
API returns.

Access follows the rest of the read API: a stream token from
``Authorization: Bearer`` or ``?token=``, verified with the server's
``stream_secret``. ``GET /traces/{id}`` needs a token granting that trace
(``trace:<id>`` or ``*``); ``GET /traces`` lists every trace and needs ``*``.
``admin_token`` reads everything; ``open_access`` turns checks off (local
development). No token is 401; a forged, expired or other-scope token is 403.

``GET /traces`` query parameters: ``status``, ``name``, ``tag``, ``metadata``
(``key=value``, repeatable; matches the root run's metadata), ``limit``
(1..1000, default 50) and ``cursor`` (the previous page's ``next_cursor``).
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bus.access import check_access
from bus.access import error_response as _error
from bus.errors import AccessDenied, InvalidQuery
from bus.parsing import key_values
from bus.settings import Settings
from bus.traces.agents import agent_tree
from bus.traces.queries import get_trace, list_traces

_JSON = "application/json"


def trace_routes(settings: Settings, redis: aioredis.Redis) -> list[BaseRoute]:
    """The routes to mount on a Starlette app; ``redis`` is a bytes async client."""

    async def one(request: Request) -> Response:
        trace_id = request.path_params["trace_id"]
        denied = _denied(request, settings, trace_id=trace_id)
        if denied is not None:
            return denied
        trace = await get_trace(redis, settings, trace_id)
        if trace is None:
            return _error(404, f"no trace {trace_id!r} (unknown or expired)")
        return Response(msgspec.json.encode(trace), media_type=_JSON)

    async def many(request: Request) -> Response:
        denied = _denied(request, settings, trace_id=None)
        if denied is not None:
            return denied
        query = request.query_params
        try:
            metadata = key_values(query.getlist("metadata"), option="metadata")
            page = await list_traces(
                redis,
                settings,
                status=query.get("status"),
                name=query.get("name"),
                tag=query.get("tag"),
                metadata=metadata,
                limit=_limit(query.get("limit", "50")),
                cursor=query.get("cursor"),
            )
        except InvalidQuery as exc:
            return _error(400, str(exc))
        return Response(msgspec.json.encode(page), media_type=_JSON)

    return [
        Route("/traces", many, methods=["GET"]),
        Route("/traces/{trace_id}", one, methods=["GET"]),
    ]


def _limit(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidQuery(f"limit must be a whole number, got {text!r}") from None


def _denied(request: Request, settings: Settings, *, trace_id: str | None) -> Response | None:
    """None when the request may read ``trace_id`` (every trace, scope ``*``, when None)."""
    try:
        check_access(request, settings, trace_id=trace_id)
    except AccessDenied as exc:
        return _error(exc.status, exc.reason)
    return None


async def thread_agent_tree(
    redis: aioredis.Redis, settings: Settings, run_id: str, *, thread_id: str | None
) -> dict[str, Any] | None:
    """The protocol's agent tree (``agent.getTree``) of run ``run_id``, or None when its
    run tree is unknown or the run is not on ``thread_id`` (None: ``run_id``'s own trace)."""
    trace = await get_trace(redis, settings, run_id)
    if trace is None:
        return None
    if thread_id is not None and str(trace.metadata.get("thread_id")) != thread_id:
        return None
    return agent_tree(trace)
