"""One streaming client's view of one live channel (fed by :mod:`bus.frontend.hub`)."""

from __future__ import annotations

import asyncio
from collections import deque

from bus.errors import SlowConsumer
from bus.history import StreamItem

__all__ = ["Subscriber"]


class Subscriber:
    """One client's view of one channel: a bounded queue and two flags.

    ``resync`` asks the client to re-read history after its last event (set
    after a reconnect, or when the queue overflows while the client is still
    replaying history: then history has everything the queue dropped).
    ``overflowed`` means the client fell behind while live: it is dropped.
    """

    __slots__ = ("_wake", "items", "maxsize", "overflowed", "replaying", "resync")

    def __init__(self, maxsize: int) -> None:
        self.items: deque[StreamItem] = deque()
        self.maxsize = maxsize
        self.resync = True
        self.replaying = False
        self.overflowed = False
        self._wake = asyncio.Event()

    def offer(self, item: StreamItem) -> None:
        """Called by the hub's reader; never blocks."""
        if self.overflowed:
            return
        if len(self.items) >= self.maxsize:
            self.items.clear()
            if self.replaying:
                self.resync = True
            else:
                self.overflowed = True
        else:
            self.items.append(item)
        self._wake.set()

    def request_resync(self) -> None:
        self.resync = True
        self._wake.set()

    def drain(self) -> list[StreamItem]:
        """Every live item queued right now (none while a resync or a drop is pending)."""
        if self.overflowed or self.resync or not self.items:
            return []
        items = list(self.items)
        self.items.clear()
        return items

    async def next(self) -> StreamItem | None:
        """The next live item, or None when the client must resync from history."""
        while True:
            if self.overflowed:
                raise SlowConsumer("client fell behind its queue (slow consumer)")
            if self.resync:
                return None
            if self.items:
                return self.items.popleft()
            self._wake.clear()
            await self._wake.wait()
