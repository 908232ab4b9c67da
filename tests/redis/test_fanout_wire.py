"""The fan-out handler's hand-packed round trips (bus.fanout.wire) against a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError, NoScriptError, ResponseError

from bus.connect import async_client
from bus.fanout import wire
from bus.scripts import LuaScript
from bus.settings import Settings


def test_packing_is_what_redis_py_sends() -> None:
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 2, "k:{t}:1", "k:{t}:2", 0, b"\x00\xffblob", 86_400, "é"),
        ("HMGET", "k:{t}:1", b"v", b"s"),
        ("SET", "k", b""),
    ]
    for _ in range(2):  # the second time from the cache of str and int arguments
        assert wire.pack(commands) == b"".join(Connection().pack_commands(commands))
    with pytest.raises(DataError):
        wire.pack([("SET", "k", 1.5)])


async def test_an_error_reply_is_raised_after_every_reply_was_read(settings: Settings) -> None:
    client = async_client(settings, max_connections=1)
    key = f"{settings.prefix}:{{wire}}"
    try:

        def build(pipe: Any) -> None:
            pipe.execute_command("SET", f"{key}:a", b"1")
            pipe.execute_command("INCR", f"{key}:text")  # an error reply: not an integer
            pipe.execute_command("SET", f"{key}:b", b"2")

        await client.set(f"{key}:text", "not a number")
        with pytest.raises(ResponseError, match="not an integer"):
            await wire.send(client, build)
        # Every command ran, and the connection is still in step with its replies.
        replies = await wire.send(client, lambda pipe: pipe.hmget(f"{key}:h", [b"x"]))
        assert replies == [[None]]
        assert await client.mget(f"{key}:a", f"{key}:b") == [b"1", b"2"]
    finally:
        await client.delete(f"{key}:a", f"{key}:b", f"{key}:text")
        await client.aclose()


async def test_execute_loads_the_scripts_on_noscript(settings: Settings) -> None:
    client = async_client(settings)
    script = LuaScript(f"return '{settings.prefix}'")  # a script this server never saw
    try:
        with pytest.raises(NoScriptError):
            await wire.send(client, lambda pipe: script.queue(pipe, [], []))
        replies = await wire.execute(client, [script], lambda pipe: script.queue(pipe, [], []))
        assert replies == [settings.prefix.encode()]
    finally:
        await client.aclose()
