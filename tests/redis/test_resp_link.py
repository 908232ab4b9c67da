"""The hand-packed round trips' own connection, against real Redis servers.

The shared Redis for the replies and the pipelining; a redis-server of the
test's own for the faults (paused, killed) and the handshake (password, db,
client name, a Unix socket).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bus.runtime.resp_link import RespLink
from bus.runtime.roundtrip import command, round_trip, xreadgroup
from bus.settings import Settings
from tests.support.redis_server import OwnedRedis


def _link(client: aioredis.Redis) -> RespLink:
    link = RespLink.for_client(client)
    assert link is not None, "a plain TCP client gets a link"
    return link


@contextlib.asynccontextmanager
async def _link_to(url: str, **options: Any) -> AsyncIterator[RespLink]:
    """A link made from a redis-py client of ``url`` (both closed afterwards)."""
    client = aioredis.Redis.from_url(url, **options)
    link = _link(client)
    try:
        yield link
    finally:
        link.close()
        await client.aclose()


@pytest.fixture
def owned() -> Iterator[OwnedRedis]:
    with OwnedRedis() as server:
        server.start()
        yield server


async def test_replies_are_those_redis_py_reads_over_resp2(
    async_redis: aioredis.Redis, settings: Settings
) -> None:
    key, stream = f"{settings.prefix}:k", f"{settings.prefix}:s".encode()
    await async_redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await async_redis.xadd(stream, {"a": "1", "b": b"\xff\x00"})
    await async_redis.xreadgroup("g", "c", {stream: ">"})  # pending now: read again from "0"
    await async_redis.hset(key + "h", "f", "1")
    await async_redis.set(key, "v")
    commands = [
        command(b"GET", key.encode()),
        command(b"HGETALL", key.encode() + b"h"),
        command(b"EXISTS", key.encode()),
        xreadgroup(stream, b"g", b"c", b"0", 10, None),
        command(b"XPENDING", stream, b"g"),
        command(b"GET", key.encode() + b"missing"),
    ]
    link = _link(async_redis)
    try:
        ours = await link.round_trip(commands, len(commands))
    finally:
        link.close()
    # The link speaks RESP2 (redis-py 8 defaults to RESP3, whose replies the readers
    # also read): the same replies as redis-py's on a RESP2 connection.
    resp2 = aioredis.Redis.from_url(settings.redis_url, protocol=2)
    try:
        theirs = await round_trip(resp2, commands, len(commands))
    finally:
        await resp2.aclose()
    assert ours == theirs
    assert ours[3][0][1][0][1] == [b"a", b"1", b"b", b"\xff\x00"]


async def test_an_error_reply_is_raised_after_every_reply_and_the_link_stays_in_step(
    async_redis: aioredis.Redis, settings: Settings
) -> None:
    key = f"{settings.prefix}:k".encode()
    link = _link(async_redis)
    try:
        with pytest.raises(NoScriptError):
            await link.round_trip(
                [command(b"SET", key, b"1"), command(b"EVALSHA", b"0" * 40, b"0")], 2
            )
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await link.round_trip([command(b"LPUSH", key, b"x")], 1)
        assert await link.round_trip([command(b"GET", key)], 1) == [b"1"]
    finally:
        link.close()


async def test_concurrent_round_trips_pipeline_on_one_connection(
    async_redis: aioredis.Redis,
) -> None:
    link = _link(async_redis)

    async def echo(i: int) -> list[bytes]:
        values = [b"%d-%d" % (i, j) for j in range(i % 4 + 1)]
        replies = await link.round_trip([command(b"ECHO", v) for v in values], len(values))
        assert replies == values
        return replies

    try:
        await asyncio.gather(*(echo(i) for i in range(200)))
        (clients,) = await link.round_trip([command(b"CLIENT", b"ID")], 1)
        assert isinstance(clients, int)
    finally:
        link.close()


async def test_a_cancelled_caller_leaves_its_replies_to_be_dropped(owned: OwnedRedis) -> None:
    async with _link_to(owned.url, socket_timeout=10) as link:
        await link.round_trip([command(b"SET", b"k", b"first")], 1)
        owned.pause()  # the replies wait until the server runs again
        early = asyncio.ensure_future(link.round_trip([command(b"GET", b"k")], 1))
        await asyncio.sleep(0.05)
        early.cancel()
        later = asyncio.ensure_future(link.round_trip([command(b"ECHO", b"later")], 1))
        await asyncio.sleep(0.05)
        owned.resume()
        assert await later == [b"later"]  # not the cancelled GET's reply
        assert early.cancelled()
        assert await link.round_trip([command(b"GET", b"k")], 1) == [b"first"]


async def test_a_cancelled_blocking_read_is_dropped_by_redis(
    async_redis: aioredis.Redis, settings: Settings
) -> None:
    """Cancelling a blocked XREADGROUP closes the connection, so Redis never hands
    the read an entry that nobody would handle."""
    stream = f"{settings.prefix}:s".encode()
    await async_redis.xgroup_create(stream, "g", id="$", mkstream=True)
    link = _link(async_redis)
    try:
        read = asyncio.ensure_future(
            link.round_trip([xreadgroup(stream, b"g", b"c", b">", 10, 5000)], 1, blocking=True)
        )
        await asyncio.sleep(0.1)
        read.cancel()
        await asyncio.sleep(0.1)
        await async_redis.xadd(stream, {"a": "1"})
        await asyncio.sleep(0.1)
        summary = await async_redis.xpending(stream, "g")
        assert summary["pending"] == 0, "the cancelled read took the entry"
        # The next round trip connects again.
        (reply,) = await link.round_trip([xreadgroup(stream, b"g", b"c", b">", 10, None)], 1)
        assert reply[0][1][0][1] == [b"a", b"1"]
    finally:
        link.close()


async def test_a_paused_server_times_out_and_the_link_reconnects(owned: OwnedRedis) -> None:
    async with _link_to(owned.url, socket_timeout=0.3) as link:
        assert await link.round_trip([command(b"PING")], 1) == [b"PONG"]
        owned.pause()
        try:
            with pytest.raises(RedisTimeoutError):
                await link.round_trip([command(b"PING")], 1)
            assert not link.connected
        finally:
            owned.resume()
        assert await link.round_trip([command(b"PING")], 1) == [b"PONG"]


async def test_a_killed_server_fails_the_waiters_and_a_new_one_is_reached(
    owned: OwnedRedis,
) -> None:
    async with _link_to(owned.url, socket_timeout=5) as link:
        await link.round_trip([command(b"SET", b"k", b"1")], 1)
        owned.pause()
        waiting = asyncio.ensure_future(link.round_trip([command(b"GET", b"k")], 1))
        await asyncio.sleep(0.05)
        owned.kill()
        with pytest.raises(RedisConnectionError):
            await waiting
        with pytest.raises(RedisConnectionError):
            await link.round_trip([command(b"PING")], 1)  # nobody listens
        owned.start()  # empty: it kept nothing on disk
        assert await link.round_trip([command(b"GET", b"k")], 1) == [None]


async def test_the_handshake_sends_password_database_and_name(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    with OwnedRedis(password="s3cret", args=["--unixsocket", str(socket_path)]) as server:
        server.start()
        for url in (
            f"redis://:s3cret@127.0.0.1:{server.port}/3",
            f"unix://:s3cret@{socket_path}?db=3",
        ):
            client = aioredis.Redis.from_url(url, client_name="lcbus-link-test")
            link = _link(client)
            try:
                await link.round_trip([command(b"SET", b"k", b"in-db-3")], 1)
                (name, info) = await link.round_trip(
                    [command(b"CLIENT", b"GETNAME"), command(b"CLIENT", b"INFO")], 2
                )
                assert name == b"lcbus-link-test"
                assert b" db=3 " in info
                assert await client.get("k") == b"in-db-3"  # redis-py sees the same db
            finally:
                link.close()
                await client.aclose()
        async with _link_to(f"redis://:nope@127.0.0.1:{server.port}/0") as wrong:
            with pytest.raises(AuthenticationError):
                await wrong.round_trip([command(b"PING")], 1)
            assert not wrong.connected


async def test_clients_a_link_does_not_cover_get_none() -> None:
    uncovered = [
        aioredis.Redis.from_url("rediss://127.0.0.1:6379/0"),
        aioredis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True),
        aioredis.Redis.from_url("redis://127.0.0.1:6379/0", protocol=3),
        aioredis.Redis(credential_provider=UsernamePasswordCredentialProvider("u", "p")),
    ]
    for client in uncovered:
        assert RespLink.for_client(client) is None
        await client.aclose()


async def test_a_closed_link_refuses_round_trips(async_redis: aioredis.Redis) -> None:
    link = _link(async_redis)
    await link.round_trip([command(b"PING")], 1)
    link.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await link.round_trip([command(b"PING")], 1)


def test_a_link_runs_on_uvloop(settings: Settings) -> None:
    """uvloop's transports are not asyncio's classes; the frontend's loop is uvloop."""
    uvloop = pytest.importorskip("uvloop")
    key = f"{settings.prefix}:uv".encode()

    async def run() -> list[object]:
        client = aioredis.Redis.from_url(settings.redis_url)
        link = _link(client)
        try:
            await link.round_trip([command(b"SET", key, b"1")], 1)
            return await asyncio.gather(
                *(link.round_trip([command(b"GET", key)], 1) for _ in range(20))
            )
        finally:
            link.close()
            await client.delete(key)
            await client.aclose()

    assert uvloop.run(run()) == [[b"1"]] * 20
