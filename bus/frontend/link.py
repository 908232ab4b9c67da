"""One pub/sub connection of the frontend hub (:mod:`bus.frontend.hub`): it subscribes
its channels, reads every reply, hands messages and confirmations to the hub, and
reconnects with backoff when the connection drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

from redis.exceptions import ClusterDownError, MovedError, RedisError, ResponseError

if TYPE_CHECKING:
    from bus.frontend.hub import Hub

log = logging.getLogger("bus.frontend.hub")

RETRY_S = (0.05, 0.2, 0.5, 1.0, 2.0)
"""Pause before each reconnect (and each routing retry), by consecutive failure."""


class Link:
    """One pub/sub connection: subscribes its channels, reads and dispatches replies.

    The connection is a raw :class:`redis.asyncio.Connection` rather than
    redis-py's ``PubSub`` so that the hub, not the library, decides how
    reconnection and confirmations work.
    """

    def __init__(self, hub: Hub, commands: tuple[str, str], connect: Any) -> None:
        self._hub = hub
        self._connect = connect
        self._subscribe_cmd, self._unsubscribe_cmd = commands
        self.channels: set[str] = set()
        self.confirmed: set[str] = set()
        # SUBSCRIBEs sent per channel on the current connection and not yet confirmed.
        self._pending: dict[str, int] = {}
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.reconnects = 0
        self._heard_at = 0.0  # loop time of the last reply on the current connection
        self._silent = False  # the watchdog cancelled the reader: the connection is dead

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lcbus-hub")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        await self._send(self._subscribe_cmd, channel)

    async def unsubscribe(self, channel: str) -> None:
        self.forget(channel)
        await self._send(self._unsubscribe_cmd, channel)

    def drop_pending(self, channel: str) -> None:
        self._pending.pop(channel, None)

    def forget(self, channel: str) -> None:
        self.channels.discard(channel)
        self.confirmed.discard(channel)

    async def _send(self, command: str, channel: str) -> None:
        conn = self._conn
        if conn is None:
            return  # the reader subscribes every channel of the link when it reconnects
        if command == self._subscribe_cmd:
            self._pending[channel] = self._pending.get(channel, 0) + 1
        try:
            await conn.send_command(command, channel)
        # redis-py raises AttributeError when the reader tore the connection down
        # under this send (its writer is gone): the same lost connection.
        except (RedisError, OSError, AttributeError) as exc:
            log.warning(
                "pub/sub %s %s failed (%s); the reader will reconnect", command, channel, exc
            )

    async def _run(self) -> None:
        failures = 0
        while True:
            conn = self._connect()
            try:
                await conn.connect()
                await self._resubscribe_all(conn)
                failures = 0
                await self._pump(conn)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._silent or task is None or task.uncancel() > 0:
                    raise
                log.warning("pub/sub connection did not answer PING; reconnecting")
            finally:
                self._silent = False
                self._conn = None
                self.connected = False
                self.confirmed.clear()
                self._hub.lost(self)
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            # On a cluster the slots may have moved while the node was away (failover).
            await self._hub.reroute(self)
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1
            self.reconnects += 1

    async def _resubscribe_all(self, conn: Any) -> None:
        self._pending = {}
        self._conn = conn
        self.connected = True
        # Snapshot with no await in between: channels added later send their own SUBSCRIBE.
        for channel in list(self.channels):
            await self._send(self._subscribe_cmd, channel)

    async def _pump(self, conn: Any) -> None:
        # Replies are read with no timeout: a timeout per read (redis-py enters an
        # asyncio.timeout for each) was a tenth of the frontend's CPU with 2,000
        # messages a second. A silent connection is the watchdog's to find.
        loop = asyncio.get_running_loop()
        self._heard_at = loop.time()
        reader = asyncio.current_task()
        assert reader is not None
        watchdog = asyncio.create_task(self._watch(conn, reader), name="lcbus-hub-watchdog")
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except (MovedError, ClusterDownError, ResponseError) as exc:
                    # A subscription refused (its slot lives elsewhere now): route it anew.
                    log.info("pub/sub subscription refused (%s); rerouting", exc)
                    await self._hub.reroute(self)
                    continue
                self._heard_at = loop.time()
                if isinstance(reply, list) and reply:
                    await self._handle(reply)
        finally:
            watchdog.cancel()

    async def _watch(self, conn: Any, reader: asyncio.Task[None]) -> None:
        """PING a connection silent for a ping interval; no reply within another
        interval means it is dead (no RST ever came): the reader is cancelled."""
        loop = asyncio.get_running_loop()
        interval = self._hub.ping_interval_s
        while True:
            await asyncio.sleep(max(0.0, self._heard_at + interval - loop.time()))
            if loop.time() - self._heard_at < interval:
                continue
            asked_at = loop.time()
            with contextlib.suppress(RedisError, OSError, AttributeError):
                await conn.send_command("PING")
            await asyncio.sleep(interval)
            if self._heard_at < asked_at:
                self._silent = True
                reader.cancel()
                return

    async def _handle(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind in (b"message", b"smessage"):
            self._hub.deliver(reply[1], reply[2])
        elif kind in (b"subscribe", b"ssubscribe"):
            await self._hub.ensure_mapped(reply[1].decode())
            self._confirm(reply[1].decode())
        elif kind == b"sunsubscribe" and reply[1].decode() in self.confirmed:
            # Not asked for: the node gave the channel's slot away (a migration).
            self.confirmed.discard(reply[1].decode())
            await self._hub.reroute(self)

    def _confirm(self, channel: str) -> None:
        left = self._pending.get(channel, 1) - 1
        if left > 0:
            self._pending[channel] = left
            return
        self._pending.pop(channel, None)
        if channel in self.channels:
            self.confirmed.add(channel)
            self._hub.confirmed(self, channel)
