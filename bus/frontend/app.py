"""The frontend ASGI application: streaming endpoints, health, and mounted extras."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from bus.connect import async_client, is_cluster
from bus.frontend.commands import commands
from bus.frontend.event_stream import SERVER_SEND_SCOPE_KEY
from bus.frontend.hub import Hub, hub_name
from bus.frontend.sse import (
    TRANSPORT_SCOPE_KEY,
    drain_on_shutdown,
    is_transport,
    thread_stream,
    trace_stream,
)
from bus.frontend.state import AppState
from bus.frontend.thread_socket import thread_events_socket
from bus.frontend.threads import stream_events
from bus.frontend.ws import thread_socket
from bus.keys import Keys
from bus.settings import Settings
from bus.traces.api import trace_routes
from bus.webhooks.admin import admin_routes

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSONResponse:
    """200 when Redis answers and the pub/sub connection is up; 503 otherwise."""
    state: AppState = request.app.state.bus
    try:
        await state.redis.ping()
    except (RedisError, OSError) as exc:
        return JSONResponse({"ok": False, "redis": str(exc)}, status_code=503)
    body = {
        "ok": state.hub.connected,
        "pubsub": state.hub.connected,
        "channels": state.hub.channel_count,
        "pubsub_reconnects": state.hub.reconnects,
        "live_sent_at_once": state.hub.sent_at_once,
        "live_queued": state.hub.queued,
    }
    return JSONResponse(body, status_code=200 if state.hub.connected else 503)


STATIC_DIR = Path(__file__).with_name("static")


async def index(request: Request) -> FileResponse:
    """The browser page: watch a trace live (``?trace=&token=``), or start runs in the demo."""
    return FileResponse(STATIC_DIR / "index.html")


def create_app(
    settings: Settings,
    *,
    redis: aioredis.Redis | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """The frontend app. ``redis`` (a bytes client) is used as given and not closed."""

    # Created now (it connects lazily) so that mounted APIs can share it.
    client = redis if redis is not None else frontend_redis(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(
            client,
            queue_size=settings.client_queue_size,
            queue_bytes=settings.client_queue_bytes,
            ping_interval_s=settings.ping_interval_s,
            name=hub_name(settings.prefix),
            history_reads=max(1, settings.frontend_redis_connections // 2),
        )
        state = AppState(settings, client, Keys(settings.prefix, settings.partitions), hub)
        app.state.bus = state
        if not settings.open_access and not settings.stream_secret and not settings.admin_token:
            log.warning("no LCBUS_STREAM_SECRET or LCBUS_ADMIN_TOKEN: every stream is refused")
        async with hub:
            drain = asyncio.create_task(drain_on_shutdown(state), name="lcbus-drain")
            try:
                yield
            finally:
                drain.cancel()
                if redis is None:
                    await client.aclose()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/traces/{trace_id}/stream", trace_stream, methods=["GET"]),
        Route("/threads/{thread_id}/stream", thread_stream, methods=["POST"]),
        WebSocketRoute("/threads/{thread_id}/stream", thread_socket),
        # LangGraph's thread streams, as its SDKs read them.
        Route("/threads/{thread_id}/stream/events", stream_events, methods=["POST"]),
        WebSocketRoute("/threads/{thread_id}/stream/events", thread_events_socket),
        Route("/threads/{thread_id}/commands", commands, methods=["POST"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        *trace_routes(settings, client),
        Mount("/admin", routes=admin_routes(settings, client)),
        *extra_routes,
    ]
    return FrontendApp(routes=routes, lifespan=lifespan, middleware=_middleware(settings))


def frontend_redis(settings: Settings) -> aioredis.Redis:
    """The process's Redis client: a bounded pool that waits for a free connection.

    A burst of clients waits for a connection instead of failing, and the socket
    timeout turns an unresponsive Redis into an error a stream can report.
    On a cluster the cluster client keeps a bounded pool per node.
    """
    if is_cluster(settings):
        return async_client(
            settings,
            max_connections=settings.frontend_redis_connections,
            socket_timeout=settings.frontend_redis_timeout_s,
            socket_connect_timeout=settings.frontend_redis_timeout_s,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.frontend_redis_connections,
        timeout=settings.frontend_redis_wait_s,
        socket_timeout=settings.frontend_redis_timeout_s,
        socket_connect_timeout=settings.frontend_redis_timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


class FrontendApp(Starlette):
    """The Starlette app, plus a way for a stream to cut a connection stuck in a write.

    ASGI offers no way to abort a connection, and closing one waits until its
    buffered bytes are sent, which never happens for a client that stopped
    reading. Under uvicorn the ``send`` callable belongs to an object holding
    the connection's transport: it is put in the scope as ``lcbus.transport``
    (absent under other servers, where a frozen client waits for the send timeout).
    The ``send`` itself goes in as ``lcbus.server_send``, for the body chunks of
    event streams (see :mod:`bus.frontend.event_stream`).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if is_transport(transport):
            scope[TRANSPORT_SCOPE_KEY] = transport
        scope[SERVER_SEND_SCOPE_KEY] = send
        await super().__call__(scope, receive, send)


def _middleware(settings: Settings) -> list[Middleware]:
    """CORS for browser pages on the listed origins (none unless configured).

    The stream token travels in ``?token=`` or ``Authorization``, never in a
    cookie, so credentials mode stays off; ``Last-Event-ID`` is allowed so that a
    page on another origin can resume a thread stream with ``fetch``.
    """
    origins = settings.cors_origin_list
    if not origins:
        return []
    cors = Middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Accept"],
        max_age=600,
    )
    return [cors]
