"""Admin HTTP API for webhook endpoints, as Starlette routes to mount (under ``/admin``).

Every route needs ``Authorization: Bearer <LCBUS_ADMIN_TOKEN>``: 401 without
a bearer token, 403 with a wrong one, 503 when no admin token is configured
(the API stays closed rather than open).

=======  =====================================  ==========================================
method   path                                   does
=======  =====================================  ==========================================
GET      /webhooks/endpoints                    list (secrets shortened)
POST     /webhooks/endpoints                    add: {url, events?, tags?, metadata?, secret?,
                                                rate_limit?, max_concurrency?, description?}
GET      /webhooks/endpoints/{id}               one endpoint, with secrets
DELETE   /webhooks/endpoints/{id}               remove
POST     /webhooks/endpoints/{id}/enable        enable
POST     /webhooks/endpoints/{id}/disable       disable: {reason?}
POST     /webhooks/endpoints/{id}/rotate-secret rotate: {secret?, grace_s?}
GET      /webhooks/endpoints/{id}/attempts      latest attempts (?limit=)
GET      /webhooks/dead                         dead letters (?since=, ?limit=)
POST     /webhooks/replay                       {message_id} or {since}
=======  =====================================  ==========================================
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bus.access import bearer_token
from bus.access import error_response as _error
from bus.connect import queue_client
from bus.errors import ConfigError, EndpointNotFound, WebhookError
from bus.settings import Settings
from bus.webhooks.endpoints import Endpoints
from bus.webhooks.outbox import dead_letters, replay, replay_since

Handler = Callable[[Request], Awaitable[Response]]


class _AddBody(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    events: list[str] = msgspec.field(default_factory=lambda: ["*"])
    tags: list[str] = []
    metadata: dict[str, str] = {}
    secret: str | None = None
    rate_limit: int = 0
    max_concurrency: int = 10
    description: str = ""


DEFAULT_DISABLE_REASON = "disabled by an operator"


class _DisableBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = DEFAULT_DISABLE_REASON


class _RotateBody(msgspec.Struct, forbid_unknown_fields=True):
    secret: str | None = None
    grace_s: float | None = None


class _ReplayBody(msgspec.Struct, forbid_unknown_fields=True):
    message_id: str | None = None
    since: float | None = None


MAX_LIMIT = 10_000
MAX_SECONDS = 10**12  # Unix seconds or a duration; far beyond any real one, within stream ids


def _seconds(value: float | None, name: str) -> float | None:
    """A finite, non-negative number of seconds (or None)."""
    if value is not None and not 0 <= value <= MAX_SECONDS:
        raise WebhookError(f"{name} must be a finite number >= 0 (at most 1e12), got {value!r}")
    return value


def _query_seconds(request: Request, name: str) -> float:
    raw = request.query_params.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        raise WebhookError(f"?{name}= must be Unix seconds, got {raw!r}") from None
    seconds = _seconds(value, f"?{name}=")
    return 0.0 if seconds is None else seconds


def _query_limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise WebhookError(f"?limit= must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
    return int(raw)


class _Admin:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = Endpoints(redis=redis, settings=settings)
        self._arq: ArqRedis | None = None

    @property
    def arq(self) -> ArqRedis:
        """arq's queue, for replays: made on first use, so that a frontend on a cluster
        without ``LCBUS_QUEUE_REDIS_URL`` still streams (its replay answers 503)."""
        if self._arq is None:
            self._arq = queue_client(self.settings, share=self.redis)
        return self._arq

    def guarded(self, handler: Handler) -> Handler:
        token = self.settings.admin_token

        async def endpoint(request: Request) -> Response:
            if not token:
                return _error(503, "admin API disabled: set LCBUS_ADMIN_TOKEN")
            given = bearer_token(request)
            if given is None:
                return _error(401, "send Authorization: Bearer <admin token>")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return _error(403, "wrong admin token")
            try:
                return await handler(request)
            except EndpointNotFound as exc:
                return _error(404, str(exc))
            except ConfigError as exc:  # a replay with no queue Redis configured
                return _error(503, str(exc))
            except (WebhookError, msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                return _error(400, str(exc))

        return endpoint

    async def list_endpoints(self, request: Request) -> Response:
        return JSONResponse([e.to_dict(with_secrets=False) for e in await self.registry.all()])

    async def add(self, request: Request) -> Response:
        spec = msgspec.convert(await _body(request), _AddBody)
        options = {k: getattr(spec, k) for k in spec.__struct_fields__ if k != "url"}
        endpoint = await self.registry.add(spec.url, **options)
        return JSONResponse(endpoint.to_dict(), status_code=201)

    async def show(self, request: Request) -> Response:
        return JSONResponse((await self.registry.get(request.path_params["id"])).to_dict())

    async def remove(self, request: Request) -> Response:
        await self.registry.remove(request.path_params["id"])
        return Response(status_code=204)

    async def enable(self, request: Request) -> Response:
        await self.registry.enable(request.path_params["id"])
        return await self.show(request)

    async def disable(self, request: Request) -> Response:
        spec = msgspec.convert(await _body(request), _DisableBody)
        reason = spec.reason or DEFAULT_DISABLE_REASON
        await self.registry.disable(request.path_params["id"], reason)
        return await self.show(request)

    async def rotate(self, request: Request) -> Response:
        spec = msgspec.convert(await _body(request), _RotateBody)
        endpoint = await self.registry.rotate_secret(
            request.path_params["id"],
            secret=spec.secret,
            grace_s=_seconds(spec.grace_s, "grace_s"),
        )
        return JSONResponse(endpoint.to_dict())

    async def attempts(self, request: Request) -> Response:
        endpoint_id = request.path_params["id"]
        limit = _query_limit(request, 50)
        await self.registry.get(endpoint_id)
        found = await self.registry.attempts(endpoint_id, limit=limit)
        return JSONResponse(msgspec.to_builtins(found))

    async def dead(self, request: Request) -> Response:
        since = _query_seconds(request, "since")
        limit = _query_limit(request, 100)
        found = await dead_letters(self.redis, self.settings, since=since, limit=limit)
        return JSONResponse([d.to_dict() for d in found])

    async def replay(self, request: Request) -> Response:
        spec = msgspec.convert(await _body(request), _ReplayBody)
        since = _seconds(spec.since, "since")
        if spec.message_id:
            count = await replay(self.redis, self.arq, self.settings, spec.message_id)
        elif since is not None:
            count = await replay_since(self.redis, self.arq, self.settings, since)
        else:
            raise WebhookError('send {"message_id": ...} or {"since": <unix seconds>}')
        return JSONResponse({"replayed": count})


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    data = msgspec.json.decode(raw) if raw else {}
    if not isinstance(data, dict):
        raise WebhookError("the request body must be a JSON object")
    return data


def admin_routes(settings: Settings, redis: aioredis.Redis) -> list[BaseRoute]:
    """The webhook admin routes, guarded by ``settings.admin_token``."""
    api = _Admin(settings, redis)
    g = api.guarded
    base = "/webhooks/endpoints"
    return [
        Route(base, g(api.list_endpoints), methods=["GET"]),
        Route(base, g(api.add), methods=["POST"]),
        Route(base + "/{id}", g(api.show), methods=["GET"]),
        Route(base + "/{id}", g(api.remove), methods=["DELETE"]),
        Route(base + "/{id}/enable", g(api.enable), methods=["POST"]),
        Route(base + "/{id}/disable", g(api.disable), methods=["POST"]),
        Route(base + "/{id}/rotate-secret", g(api.rotate), methods=["POST"]),
        Route(base + "/{id}/attempts", g(api.attempts), methods=["GET"]),
        Route("/webhooks/dead", g(api.dead), methods=["GET"]),
        Route("/webhooks/replay", g(api.replay), methods=["POST"]),
    ]
