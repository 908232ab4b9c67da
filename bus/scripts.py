"""Lua scripts queued by SHA in pipelines, without a round trip to check they exist.

redis-py's ``Script`` objects make every pipeline that uses them send
``SCRIPT EXISTS`` first: one more round trip per batch on the trace worker's
hot path. Here a pipeline queues ``EVALSHA`` directly; when the server does
not know the script (first use, or after a restart flushed its cache) the
pipeline fails with ``NoScriptError``, the scripts are loaded, and the whole
pipeline is built and sent again (callers queue only idempotent commands).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        # execute_command, not pipe.evalsha: redis-py refuses the latter in cluster pipelines.
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def execute(
    redis: aioredis.Redis, scripts: Sequence[LuaScript], build: Callable[[Any], None]
) -> list[Any]:
    """Run the pipeline ``build`` fills; load ``scripts`` and retry once on NOSCRIPT."""
    for attempt in (1, 2):
        async with redis.pipeline(transaction=False) as pipe:
            build(pipe)
            try:
                replies: list[Any] = await pipe.execute()
                return replies
            except NoScriptError:
                if attempt == 2:
                    raise
        for script in scripts:
            await redis.script_load(script.text)
    raise AssertionError("unreachable")
