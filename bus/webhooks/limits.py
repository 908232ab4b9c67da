"""Per-endpoint delivery limits, kept in Redis so they hold across worker processes.

Before an attempt, one script (:meth:`EndpointLimits.queue_begin`) reads the
endpoint record and says whether the endpoint may get another request now:

- a *pause* set after the endpoint answered 429/502/503/504 (its Retry-After
  within bounds, else a short exponential pause) must have run out;
- the number of in-flight deliveries (a sorted set of attempt tokens scored by
  lease end, so a killed worker's slot frees itself) must be under the
  endpoint's ``max_concurrency`` (1 while the endpoint is being slowed down);
- the deliveries started in the current second must be under ``rate_limit``.

Times come from the Redis server's clock, so workers on several hosts agree.
After the request, :meth:`EndpointLimits.queue_finish` frees the slot,
appends the attempt to the endpoint's log and, on success, records it, in one
more script. All keys of an endpoint share its hash tag, so both scripts run
on Redis Cluster too; with the message read pipelined beside the first, an
attempt costs two round trips of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from bus.keys import Keys, lua_fields
from bus.scripts import LuaScript

BUSY = -1
"""begin: the endpoint has max_concurrency deliveries in flight."""
GONE = -2
"""begin: the endpoint does not exist."""
DISABLED = -3
"""begin: the endpoint is disabled (no slot taken)."""

THROTTLE_TTL_MS = 300_000
"""A slow-down streak is forgotten after this long without a new slow-down answer."""
_MAX_PAUSE_LEVEL = 6

# KEYS: endpoint, slots, rate, pause, throttle. ARGV: token, lease ms.
# -> {code, endpoint hash as a flat list}: code 0 = slot taken, > 0 = ms to
# wait (pause or rate window), or BUSY / GONE / DISABLED. The limits come
# from the endpoint hash itself (JSON-encoded numbers read as plain text).
_BEGIN = LuaScript(
    lua_fields("""
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return {-2, record} end
local fields = {}
for i = 1, #record, 2 do fields[record[i]] = record[i + 1] end
if fields['enabled'] == 'false' then return {-3, record} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pause = redis.call('PTTL', KEYS[4])
if pause > 0 then return {pause, record} end
local limit = tonumber(fields['max_concurrency'] or '10')
if redis.call('EXISTS', KEYS[5]) == 1 then limit = 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= limit then return {-1, record} end
local rate = tonumber(fields['rate_limit'] or '0')
if rate > 0 then
  local second = math.floor(now / 1000)
  local window = tonumber(redis.call('HGET', KEYS[3], '$RATE_SECOND') or '-1')
  if window ~= second then
    redis.call('HSET', KEYS[3], '$RATE_SECOND', second, '$RATE_COUNT', 0)
    redis.call('PEXPIRE', KEYS[3], 2000)
  end
  if tonumber(redis.call('HGET', KEYS[3], '$RATE_COUNT')) >= rate then
    return {1000 - (now % 1000), record}
  end
  redis.call('HINCRBY', KEYS[3], '$RATE_COUNT', 1)
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[2], lease)
return {0, record}
""")
)

# KEYS: endpoint, slots, attempts, throttle. ARGV: token, attempt record,
# attempts maxlen, success (1/0), last_success_at (JSON).
# Frees the slot; if the endpoint still exists, logs the attempt and, on
# success, records it and ends the failure streak and slow-down. -1 if gone.
_FINISH = LuaScript(
    lua_fields("""
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', '$ATTEMPT', ARGV[2])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'last_success_at', ARGV[5])
  redis.call('HDEL', KEYS[1], 'failing_since')
  redis.call('DEL', KEYS[4])
end
return 0
""")
)

SCRIPTS = (_BEGIN, _FINISH)

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
        self._slow_down = redis.register_script(_SLOW_DOWN)

    def queue_begin(self, pipe: Any, endpoint_id: str, token: str) -> None:
        """Queue the begin script; :func:`begin_reply` reads its reply."""
        k = self.keys
        keys = [
            k.endpoint(endpoint_id),
            k.endpoint_slots(endpoint_id),
            k.endpoint_rate(endpoint_id),
            k.endpoint_pause(endpoint_id),
            k.endpoint_throttle(endpoint_id),
        ]
        _BEGIN.queue(pipe, keys, [token, self.lease_ms])

    def queue_finish(
        self,
        pipe: Any,
        endpoint_id: str,
        token: str,
        *,
        record: bytes,
        maxlen: int,
        success_at: bytes | None,
    ) -> None:
        """Queue the finish script (reply -1 if the endpoint is gone meanwhile)."""
        k = self.keys
        keys = [
            k.endpoint(endpoint_id),
            k.endpoint_slots(endpoint_id),
            k.attempts(endpoint_id),
            k.endpoint_throttle(endpoint_id),
        ]
        args = [token, record, maxlen, 1 if success_at else 0, success_at or b""]
        _FINISH.queue(pipe, keys, args)

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


def begin_reply(reply: Sequence[Any]) -> tuple[int, dict[bytes, bytes]]:
    """(code, endpoint hash) from the begin script's reply."""
    code, flat = reply
    return int(code), dict(zip(flat[::2], flat[1::2], strict=True))
