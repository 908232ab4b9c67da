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
from bus.errors import EndpointNotFound, WebhookError
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


class _Admin:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = Endpoints(redis=redis, settings=settings)
        self.arq = ArqRedis(connection_pool=redis.connection_pool)

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
        reason = (await _body(request)).get("reason") or "disabled by an operator"
        await self.registry.disable(request.path_params["id"], str(reason))
        return await self.show(request)

    async def rotate(self, request: Request) -> Response:
        data = await _body(request)
        endpoint = await self.registry.rotate_secret(
            request.path_params["id"], secret=data.get("secret"), grace_s=data.get("grace_s")
        )
        return JSONResponse(endpoint.to_dict())

    async def attempts(self, request: Request) -> Response:
        endpoint_id = request.path_params["id"]
        await self.registry.get(endpoint_id)
        limit = int(request.query_params.get("limit", "50"))
        found = await self.registry.attempts(endpoint_id, limit=limit)
        return JSONResponse(msgspec.to_builtins(found))

    async def dead(self, request: Request) -> Response:
        since = float(request.query_params.get("since", "0"))
        limit = int(request.query_params.get("limit", "100"))
        found = await dead_letters(self.redis, self.settings, since=since, limit=limit)
        return JSONResponse([d.to_dict() for d in found])

    async def replay(self, request: Request) -> Response:
        data = await _body(request)
        if data.get("message_id"):
            count = await replay(self.redis, self.arq, self.settings, str(data["message_id"]))
        elif data.get("since") is not None:
            count = await replay_since(self.redis, self.arq, self.settings, float(data["since"]))
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
