"""Lua scripts queued by SHA in pipelines, without a round trip to check they exist.

redis-py's ``Script`` objects make every pipeline that uses them send
``SCRIPT EXISTS`` first: one more round trip per batch on the trace worker's
hot path. Here a pipeline queues ``EVALSHA`` directly; when the server does
not know the script (first use, or after a restart flushed its cache) the
pipeline fails with ``NoScriptError``, the scripts are loaded, and the whole
pipeline is built and sent again (callers queue only idempotent commands).

On a Redis Cluster a pipeline is split by node by redis-py, and the commands
a node redirects are sent again: after ``MOVED`` through the cluster client,
after ``ASK`` by :func:`send` itself, as ``ASKING`` and the command on one
connection. (redis-py's asyncio cluster client sends the two as separate
pooled commands, which can land on two connections and then loop on ASK until
it gives up: that happens whenever a slot migrates under load.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError

from bus.connect import is_cluster_client


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
        try:
            return await send(redis, build)
        except NoScriptError:
            if attempt == 2:
                raise
        for script in scripts:
            await redis.script_load(script.text)
    raise AssertionError("unreachable")


async def send(redis: aioredis.Redis, build: Callable[[Any], None]) -> list[Any]:
    """One non-transactional pipeline filled by ``build``; its replies in order."""
    client: Any = redis
    pipe: Any
    async with client.pipeline(transaction=False) as pipe:
        if not is_cluster_client(redis):
            build(pipe)
            replies: list[Any] = await pipe.execute()
            return replies
        sent: list[tuple[Any, ...]] = []
        queue = pipe.execute_command

        def record(*args: Any, **kwargs: Any) -> Any:
            sent.append(args)
            return queue(*args, **kwargs)

        pipe.execute_command = record  # every pipeline method queues through it
        build(pipe)
        replies = await pipe.execute(raise_on_error=False, allow_redirections=False)
    for index, reply in enumerate(replies):
        if isinstance(reply, AskError) and not isinstance(reply, MovedError):
            replies[index] = await _asking(client, reply, sent[index])
        elif isinstance(reply, MovedError | TryAgainError):
            replies[index] = await client.execute_command(*sent[index])
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _asking(redis: Any, redirect: AskError, args: tuple[Any, ...]) -> Any:
    """Send ``args`` to the node an ASK names, preceded by ASKING on the same connection."""
    node = redis.get_node(host=redirect.host, port=redirect.port)
    if node is None:
        await redis.nodes_manager.initialize()
        node = redis.get_node(host=redirect.host, port=redirect.port)
    if node is None:
        return await redis.execute_command(*args)
    connection = node.acquire_connection()
    try:
        await connection.send_packed_command(connection.pack_commands([("ASKING",), args]))
        await node.parse_response(connection, "ASKING")
        return await node.parse_response(connection, args[0])
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        node.release(connection)
