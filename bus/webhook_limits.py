"""Per-endpoint delivery limits, kept in Redis so they hold across worker processes.

Before an attempt, :meth:`EndpointLimits.acquire` runs one script that says
whether the endpoint may get another request now:

- a *pause* set after the endpoint answered 429/502/503/504 (its Retry-After
  within bounds, else a short exponential pause) must have run out;
- the number of in-flight deliveries (a sorted set of attempt tokens scored by
  lease end, so a killed worker's slot frees itself) must be under the
  endpoint's ``max_concurrency`` (1 while the endpoint is being slowed down);
- the deliveries started in the current second must be under ``rate_limit``.

Times come from the Redis server's clock, so workers on several hosts agree.
An attempt that cannot start is deferred as a new arq job instead of holding
a worker slot, which is what keeps a slow endpoint from delaying the others.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from bus.keys import Keys

BUSY = -1
"""acquire(): the endpoint has max_concurrency deliveries in flight."""

THROTTLE_TTL_MS = 300_000
"""A slow-down streak is forgotten after this long without a new slow-down answer."""
_MAX_PAUSE_LEVEL = 6

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = redis.call('PTTL', KEYS[3])
if pause > 0 then return pause end
local limit = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[4]) == 1 then limit = 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then return -1 end
local rate = tonumber(ARGV[3])
if rate > 0 then
  local second = math.floor(now / 1000)
  local window = tonumber(redis.call('HGET', KEYS[2], 's') or '-1')
  if window ~= second then
    redis.call('HSET', KEYS[2], 's', second, 'n', 0)
    redis.call('PEXPIRE', KEYS[2], 2000)
  end
  if tonumber(redis.call('HGET', KEYS[2], 'n')) >= rate then
    return 1000 - (now % 1000)
  end
  redis.call('HINCRBY', KEYS[2], 'n', 1)
end
local lease = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 0
"""

# Record a slow-down answer: raise the streak level and pause the endpoint.
_SLOW_DOWN = """
local level = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local pause = tonumber(ARGV[1])
if pause < 0 then
  pause = math.floor(tonumber(ARGV[2]) * 2 ^ (math.min(level, tonumber(ARGV[4])) - 1))
end
if pause > 0 then redis.call('SET', KEYS[2], '1', 'PX', pause) end
return pause
"""


class EndpointLimits:
    """Concurrency slots, rate windows and slow-downs of every endpoint."""

    def __init__(self, *, redis: aioredis.Redis, keys: Keys, lease_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ms = lease_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._slow_down = redis.register_script(_SLOW_DOWN)

    async def acquire(
        self, endpoint_id: str, token: str, *, max_concurrency: int, rate_limit: int
    ) -> int:
        """0 if ``token`` holds a slot now; else ms to wait, or :data:`BUSY`."""
        k = self.keys
        result = await self._acquire(
            keys=[
                k.endpoint_slots(endpoint_id),
                k.endpoint_rate(endpoint_id),
                k.endpoint_pause(endpoint_id),
                k.endpoint_throttle(endpoint_id),
            ],
            args=[token, max_concurrency, rate_limit, self.lease_ms],
        )
        return int(result)

    async def release(self, endpoint_id: str, token: str) -> None:
        await self.redis.zrem(self.keys.endpoint_slots(endpoint_id), token)

    async def slow_down(
        self, endpoint_id: str, *, retry_after_ms: int | None, base_ms: int = 500
    ) -> int:
        """Pause the endpoint (Retry-After, else exponential); the pause in ms."""
        pause = await self._slow_down(
            keys=[self.keys.endpoint_throttle(endpoint_id), self.keys.endpoint_pause(endpoint_id)],
            args=[
                -1 if retry_after_ms is None else retry_after_ms,
                base_ms,
                THROTTLE_TTL_MS,
                _MAX_PAUSE_LEVEL,
            ],
        )
        return int(pause)

    async def recovered(self, endpoint_id: str) -> None:
        """A success ends the slow-down streak."""
        await self.redis.delete(self.keys.endpoint_throttle(endpoint_id))
