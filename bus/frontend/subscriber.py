"""One streaming client's view of one live channel (fed by :mod:`bus.frontend.hub`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from bus.errors import ServerDraining, SlowConsumer
from bus.history import StreamItem

__all__ = ["Subscriber"]


class Subscriber:
    """One client's view of one channel: a queue bounded in items and bytes, and flags.

    ``resync`` asks the client to re-read history after its last event (set
    after a reconnect, or when the queue overflows while the client is still
    replaying history or waiting to: then history has everything the queue
    dropped). ``overflowed`` means the client fell behind while live: it is
    dropped, and ``on_overflow`` (when set) is called once, so that a client
    stuck in a blocked write is cut at once rather than when the write times
    out. ``stalled`` (when set) says the client's current write has been
    blocked too long: it is then behind too, whatever its queue holds.
    ``draining`` ends the stream because the process shuts down.

    ``inline`` (when set) is offered each live item first, while the queue is
    empty and nothing is pending: the client's stream sets it while it waits
    for live items with nothing being sent, and it writes the item at once (it
    returns True when the item is taken, False to queue it as usual). A live
    token then costs one call instead of waking the stream's task.
    """

    __slots__ = (
        "_wake",
        "draining",
        "inline",
        "items",
        "max_bytes",
        "maxsize",
        "on_overflow",
        "overflowed",
        "queued_bytes",
        "replaying",
        "resync",
        "stalled",
    )

    def __init__(self, maxsize: int, max_bytes: int = 0) -> None:
        self.items: deque[StreamItem] = deque()
        self.maxsize = maxsize
        self.max_bytes = max_bytes  # 0: no byte bound
        self.queued_bytes = 0
        self.resync = True
        self.replaying = False
        self.overflowed = False
        self.draining = False
        self.on_overflow: Callable[[], None] | None = None
        self.stalled: Callable[[], bool] | None = None
        self.inline: Callable[[StreamItem], bool] | None = None
        self._wake = asyncio.Event()

    def offer(self, item: StreamItem) -> bool:
        """Called by the hub's reader; never blocks. True when ``inline`` took the item."""
        if self.overflowed:
            return False
        inline = self.inline
        if (
            inline is not None
            and not self.items
            and not self.resync
            and not self.draining
            and inline(item)
        ):
            return True
        size = len(item.payload)
        # An empty queue takes any one item, however big (a final event carries a
        # whole message). A client whose current write has been blocked too long is
        # behind whatever the size of its queue.
        full = (
            len(self.items) >= self.maxsize
            or (self.max_bytes > 0 and self.queued_bytes + size > self.max_bytes and self.items)
            or (self.stalled is not None and self.stalled())
        )
        if full:
            self.items.clear()
            self.queued_bytes = 0
            if self.replaying or self.resync:
                self.resync = True
            else:
                self.overflowed = True
                if self.on_overflow is not None:
                    self.on_overflow()
        else:
            self.items.append(item)
            self.queued_bytes += size
        self._wake.set()
        return False

    def drain_for_shutdown(self) -> None:
        self.draining = True
        self._wake.set()

    def request_resync(self) -> None:
        self.resync = True
        self._wake.set()

    def drain(self) -> list[StreamItem]:
        """Every live item queued right now (none while a resync or a drop is pending)."""
        if self.overflowed or self.resync or self.draining or not self.items:
            return []
        items = list(self.items)
        self.items.clear()
        self.queued_bytes = 0
        return items

    async def next(self) -> StreamItem | None:
        """The next live item, or None when the client must resync from history."""
        while True:
            if self.draining:
                raise ServerDraining("the frontend is shutting down; reconnect")
            if self.overflowed:
                raise SlowConsumer("client fell behind its queue (slow consumer)")
            if self.resync:
                return None
            if self.items:
                item = self.items.popleft()
                self.queued_bytes -= len(item.payload)
                return item
            self._wake.clear()
            await self._wake.wait()
