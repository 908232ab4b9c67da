"""The webhook endpoint registry, kept in Redis.

Each endpoint is one hash (``keys.endpoint(id)``) whose fields hold
JSON-encoded values, so that a flag such as ``enabled`` changes with one
``HSET`` and a field this version does not know is ignored; the set
``keys.endpoints()`` lists the ids. Every change to an existing endpoint goes
through a script that first checks the hash exists, so a change racing with
``remove`` never leaves a half endpoint behind.

Secrets are ``whsec_`` + base64 of 24 random bytes unless given. Rotation adds
a new secret and keeps the old ones signing for a grace period, so receivers
can switch without losing a delivery (Standard Webhooks sends one signature
per active secret).
"""

from __future__ import annotations

import base64
import binascii
import secrets as _secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import httpx
import msgspec
import redis.asyncio as aioredis

from bus.errors import EndpointNotFound, WebhookError
from bus.events import BaseEvent
from bus.keys import ATTEMPT_FIELD, Keys
from bus.settings import Settings
from bus.webhooks import ssrf
from bus.webhooks.types import matches, validate_filter

SECRET_PREFIX = "whsec_"

AttemptOutcome = Literal["success", "failure", "refused"]
"""How one attempt went: ``refused`` when the SSRF guard refused the address."""


class Secret(msgspec.Struct, kw_only=True):
    value: str
    expires_at: float | None = None
    """When a rotated-out secret stops signing; None while current."""


class Endpoint(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    url: str
    secrets: list[Secret]
    events: list[str] = msgspec.field(default_factory=lambda: ["*"])
    tags: list[str] = []
    """If set, an event must carry at least one of these tags."""
    metadata: dict[str, str] = {}
    """If set, each key must be in the event's metadata with this value (compared as text)."""
    enabled: bool = True
    rate_limit: int = 0
    """Deliveries started per second; 0 = unlimited."""
    max_concurrency: int = 10
    description: str = ""
    created_at: float = 0.0
    disabled_reason: str = ""
    disabled_at: float | None = None
    failing_since: float | None = None
    last_success_at: float | None = None

    def active_secrets(self, now: float) -> list[str]:
        return [s.value for s in self.secrets if s.expires_at is None or s.expires_at > now]

    def wants(self, event: BaseEvent, wtype: str) -> bool:
        """Whether this endpoint receives ``event`` (of webhook type ``wtype``)."""
        if not matches(self.events, wtype):
            return False
        if self.tags and not any(tag in event.tags for tag in self.tags):
            return False
        for key, value in self.metadata.items():
            if key not in event.metadata or _text(event.metadata[key]) != value:
                return False
        return True

    def to_dict(self, *, with_secrets: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = msgspec.to_builtins(
            {name: getattr(self, name) for name in self.__struct_fields__}
        )
        if not with_secrets:
            data["secrets"] = [
                {"value": s.value[:10] + "…", "expires_at": s.expires_at} for s in self.secrets
            ]
        return data


class Attempt(msgspec.Struct, kw_only=True):
    """One delivery attempt, as kept in the endpoint's attempt log."""

    id: str
    message_id: str
    attempt: int
    type: str
    outcome: AttemptOutcome
    status: int | None = None
    latency_ms: float = 0.0
    response: str = ""
    error: str = ""
    at: float = 0.0


def sendable_url(url: str) -> str:
    """``url`` as httpx will send it; WebhookError for one httpx refuses.

    Registration builds the request delivery would build, so that a URL that
    passes here (a path over 64 KB or full-width digits in the host do not)
    never fails every attempt later. The SSRF guard then checks the host httpx
    connects to, not another parser's idea of it.
    """
    try:
        return str(httpx.Request("POST", url).url)
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        shown = url if len(url) <= 200 else url[:200] + "…"
        raise WebhookError(f"webhook URL {shown!r} cannot be sent: {exc}") from None


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(24)).decode()


def validate_secret(secret: str) -> str:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookError("a webhook secret is 'whsec_' followed by base64") from exc
    if not 16 <= len(key) <= 64:
        raise WebhookError("a webhook secret must hold 16 to 64 bytes")
    return secret if secret.startswith(SECRET_PREFIX) else SECRET_PREFIX + raw


# Set fields of an existing endpoint hash only ("nx": only unset ones); -1 if it is gone.
_HSET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = 0
for i = 2, #ARGV, 2 do
  if ARGV[1] == 'nx' then
    n = n + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    n = n + redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return n
"""

# Disable an enabled endpoint: 1 if this call disabled it, 0 if it already was, -1 if gone.
_DISABLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'enabled') == 'false' then return 0 end
redis.call('HSET', KEYS[1], 'enabled', 'false', 'disabled_reason', ARGV[1], 'disabled_at', ARGV[2])
return 1
"""

_encode = msgspec.json.encode


class Endpoints:
    """The registry: ``Endpoints(redis=client, settings=settings)``."""

    def __init__(self, *, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.allow = ssrf.parse_networks(settings.webhook_allow_networks)
        self._hset = redis.register_script(_HSET_IF_EXISTS)
        self._disable = redis.register_script(_DISABLE)

    async def add(
        self,
        url: str,
        *,
        events: Iterable[str] = ("*",),
        tags: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        secret: str | None = None,
        rate_limit: int = 0,
        max_concurrency: int = 10,
        description: str = "",
    ) -> Endpoint:
        """Register an endpoint; its URL must be one httpx can send to, and pass the SSRF guard."""
        await ssrf.check_url(sendable_url(url), self.allow)
        filters = [validate_filter(e) for e in events]
        if not filters:
            raise WebhookError("an endpoint needs at least one event filter (use '*' for all)")
        if rate_limit < 0 or max_concurrency < 1:
            raise WebhookError("rate_limit must be >= 0 and max_concurrency >= 1")
        endpoint = Endpoint(
            id="ep_" + uuid.uuid4().hex,
            url=url,
            secrets=[Secret(value=validate_secret(secret) if secret else new_secret())],
            events=filters,
            tags=list(tags),
            metadata={str(k): str(v) for k, v in (metadata or {}).items()},
            rate_limit=rate_limit,
            max_concurrency=max_concurrency,
            description=description,
            created_at=time.time(),
        )
        fields = {k: _encode(v) for k, v in msgspec.to_builtins(endpoint).items()}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.endpoint(endpoint.id), mapping=fields)
            pipe.sadd(self.keys.endpoints(), endpoint.id)
            pipe.incr(self.keys.endpoints_version())
            await pipe.execute()
        return endpoint

    async def get(self, endpoint_id: str) -> Endpoint:
        raw: Any = await self.redis.hgetall(self.keys.endpoint(endpoint_id))
        if not raw:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
        return decode_endpoint(raw)

    async def all(self) -> list[Endpoint]:
        members: Any = await self.redis.smembers(self.keys.endpoints())
        ids = sorted(members)
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint_id in ids:
                pipe.hgetall(self.keys.endpoint(endpoint_id.decode()))
            replies = await pipe.execute()
        found = [decode_endpoint(raw) for raw in replies if raw]
        return sorted(found, key=lambda e: e.created_at)

    async def remove(self, endpoint_id: str) -> None:
        keys = self.keys
        # The record goes first, then its index entry: the index and the record live
        # in different slots on a cluster, so no transaction spans them, and in this
        # order a crash in between leaves an index entry that readers skip.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.endpoint(endpoint_id))
            pipe.delete(
                keys.attempts(endpoint_id),
                keys.endpoint_slots(endpoint_id),
                keys.endpoint_pause(endpoint_id),
                keys.endpoint_throttle(endpoint_id),
            )
            pipe.srem(keys.endpoints(), endpoint_id)
            pipe.incr(keys.endpoints_version())
            deleted, _, indexed, _ = await pipe.execute()
        if not deleted and not indexed:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")

    async def enable(self, endpoint_id: str) -> None:
        """Enable, forgetting the failure streak and any slow-down."""
        await self.update(
            endpoint_id, enabled=True, disabled_reason="", disabled_at=None, failing_since=None
        )
        await self.redis.delete(
            self.keys.endpoint_pause(endpoint_id), self.keys.endpoint_throttle(endpoint_id)
        )

    async def disable(self, endpoint_id: str, reason: str = "disabled by an operator") -> bool:
        """Disable; True if this call did it (False: it already was disabled)."""
        done = await self._disable(
            keys=[self.keys.endpoint(endpoint_id)], args=[_encode(reason), _encode(time.time())]
        )
        if done == -1:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
        if done:
            await self._changed()
        return bool(done)

    async def update(self, endpoint_id: str, *, only_unset: bool = False, **fields: Any) -> bool:
        """Set fields of an existing endpoint.

        With ``only_unset`` a field already present is left alone, and the
        result says whether any field was set.
        """
        key = self.keys.endpoint(endpoint_id)
        args: list[Any] = ["nx" if only_unset else "set"]
        for name, value in fields.items():
            if value is not None:
                args += [name, _encode(value)]
        changed = await self._hset(keys=[key], args=args)
        if changed == -1:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
        # An unset field is absent rather than null, so that only_unset sees it as unset.
        unset = [name for name, value in fields.items() if value is None]
        if unset:
            await self.redis.hdel(key, *unset)
        # HSET counts new fields only: any update but an only_unset that set nothing changed
        # the endpoint.
        if changed or unset or not only_unset:
            await self._changed()
        return bool(changed)

    async def _changed(self) -> None:
        """Tell routers to re-read the registry with their next batch."""
        await self.redis.incr(self.keys.endpoints_version())

    async def rotate_secret(
        self, endpoint_id: str, *, secret: str | None = None, grace_s: float | None = None
    ) -> Endpoint:
        """Add a new current secret; the others keep signing for ``grace_s``."""
        fresh = validate_secret(secret) if secret else new_secret()
        grace = self.settings.webhook_secret_grace_s if grace_s is None else grace_s
        key = self.keys.endpoint(endpoint_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw: Any = await pipe.hget(key, "secrets")
                    if raw is None:
                        raise EndpointNotFound(f"no webhook endpoint {endpoint_id!r}")
                    now = time.time()
                    old = msgspec.json.decode(raw, type=list[Secret])
                    kept = [
                        Secret(
                            value=s.value, expires_at=min(s.expires_at or now + grace, now + grace)
                        )
                        for s in old
                        if s.expires_at is None or s.expires_at > now
                    ]
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, "secrets", _encode([*kept, Secret(value=fresh)]))
                    await pipe.execute()
                    break
                except aioredis.WatchError:
                    continue
        return await self.get(endpoint_id)

    async def attempts(self, endpoint_id: str, *, limit: int = 50) -> list[Attempt]:
        """The newest attempts first."""
        entries: Any = await self.redis.xrevrange(self.keys.attempts(endpoint_id), count=limit)
        return [_attempt(entry_id, fields) for entry_id, fields in entries]

    def attempt_fields(self, attempt: Attempt) -> dict[bytes, bytes]:
        return {ATTEMPT_FIELD: _encode(attempt)}


def _attempt(entry_id: bytes, fields: dict[bytes, bytes]) -> Attempt:
    data = msgspec.json.decode(fields[ATTEMPT_FIELD])
    data["id"] = entry_id.decode()
    return msgspec.convert(data, Attempt)


def decode_endpoint(raw: Mapping[bytes, bytes]) -> Endpoint:
    data = {k.decode(): msgspec.json.decode(v) for k, v in raw.items()}
    return msgspec.convert(data, Endpoint)
