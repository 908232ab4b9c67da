"""The publisher's buffer drained from the app's own event loop.

An async app calls the handler on its event loop. A flusher thread would make
every batch cost GIL hand-offs between that thread and the loop (wake up,
linger, send, read the replies), each one a pause of the app's thread on a
busy machine. On the loop, a batch is one timer callback that writes it and
one reader callback that counts its replies: no other thread runs.

Who drains: exactly one of the publisher's thread and a :class:`LoopFlusher`,
decided under the publisher's ``_drain_lock``. The loop flusher drains while
it holds a :class:`~bus.producer.link.Link`; the thread opens that link (the
blocking part) and hands it over with ``call_soon_threadsafe``, and drains
itself while there is none. The loop never waits for the lock: when the
thread holds it (for a blocking send), the loop tries again a millisecond
later.

Taking back: the thread checks the loop every ``WATCH_EVERY_S``. When it has
stopped or closed (``asyncio.run`` returned), or when ``flush()`` runs on the
loop itself (which would otherwise wait for the loop it blocks), the flusher
is detached: the replies still owed are read with a deadline, whatever was not
answered goes back to the front of the buffer (at-least-once: it may land
twice), and the thread drains again. A link that fails on the loop puts its
unanswered batches back the same way, and the thread, with its backoff, takes
over until Redis answers it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import hiredis

from bus.producer.link import Link, LinkError, Reply, open_link
from bus.producer.resp import Entry, packed

if TYPE_CHECKING:
    from bus.producer.publisher import Publisher

log = logging.getLogger(__name__)

WATCH_EVERY_S = 0.1
"""How often the publisher's thread checks that the loop still runs."""
MAX_IN_FLIGHT = 4
"""Batches written whose replies are still due; past it the buffer waits (bounded)."""
_RETRY_S = 0.001
_STALLED_S = 5.0
"""A link whose oldest batch waits longer for its replies is given up (like a socket timeout)."""
_CONNECT_TIMEOUT_S = 2.0


class _Sent:
    """A batch written on the link, and how much of it Redis has answered."""

    __slots__ = ("answered", "batch", "error", "refused")

    def __init__(self, batch: list[Entry]) -> None:
        self.batch = batch
        self.answered = self.refused = 0
        self.error = ""


class LoopFlusher:
    """Drains one publisher's buffer on ``loop``; see the module docstring."""

    def __init__(self, publisher: Publisher, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.link: Link | None = None
        self.offered: Link | None = None
        """A link the thread handed over that the loop has not attached yet."""
        self._publisher = publisher
        self._linger = publisher.settings.flush_interval_ms / 1000
        self._in_flight: deque[_Sent] = deque()
        self._oldest_sent = 0.0
        self._writing = False
        self._armed = 0
        """1: a drain is due after the linger; 2: one is due at once (or on the next reply)."""

    @property
    def in_flight(self) -> bool:
        return bool(self._in_flight)

    # -- any thread -----------------------------------------------------------

    @property
    def holds_link(self) -> bool:
        """Whether a link is attached to the loop or on its way to it."""
        return self.link is not None or self.offered is not None

    def wake(self, now: bool) -> bool:
        """Have the loop drain after the linger (at once if ``now``); False if it cannot."""
        if self.link is None:
            return False
        if self._armed >= (2 if now else 1):
            return True
        try:
            if asyncio._get_running_loop() is self.loop:
                self._arm(now)
            else:
                self.loop.call_soon_threadsafe(self._arm, now)
        except RuntimeError:  # the loop is closed: the thread takes over
            return False
        return True

    def watch(self) -> None:
        """The thread's check, every ``WATCH_EVERY_S``: take back from a loop that stopped,
        give up a stalled link, open a link for a loop that has none."""
        loop, publisher = self.loop, self._publisher
        if loop.is_closed() or not loop.is_running():
            self.detach(publisher.settings.close_timeout_s)
        elif self._in_flight and time.monotonic() - self._oldest_sent > _STALLED_S:
            _call_soon(loop, self._locked, lambda: self._fail(TimeoutError("no reply in time")))
        elif self.link is None and self.offered is None and not publisher._failing:
            try:
                link = open_link(publisher.settings.redis_url, timeout=_CONNECT_TIMEOUT_S)
            except OSError as exc:  # the thread keeps draining; tried again on the next watch
                log.debug("lcbus publisher could not link the event loop: %s", exc)
                return
            # detach() runs under the drain lock: either it sees this offer and closes
            # it, or it ran while the link was opening, and a detached flusher takes none
            # (its attach might never run, should the loop stop first: the link would leak).
            with publisher._drain_lock:
                if publisher._loop_flusher is not self:
                    link.close()
                    return
                self.offered = link
            if not _call_soon(loop, self.attach, link):
                self.offered = None
                link.close()

    def detach(self, timeout: float) -> None:
        """Give the draining back to the thread; see "Taking back" in the module docstring."""
        publisher = self._publisher
        if not publisher._drain_lock.acquire(timeout=max(timeout, 0.001)):
            return  # the thread is mid-send on a hung Redis: it will find the loop gone
        try:
            if publisher._loop_flusher is self:
                publisher._loop_flusher = None
            if self.offered is not None:
                self.offered.close()
                self.offered = None
            link = self._release_link()
            if link is None:
                return
            due = sum(len(sent.batch) - sent.answered for sent in self._in_flight)
            if due:
                self._answered(link.settle(due, timeout))
            link.close()
            self._put_back(TimeoutError("no reply before the loop stopped"))
        finally:
            publisher._drain_lock.release()
        publisher._wakeup.set()

    def abandon(self) -> None:
        """In a forked child: close the parent's sockets, touching nothing else."""
        for link in (self.link, self.offered):
            if link is not None:
                link.close()
        self.link = self.offered = None

    # -- the loop's thread ---------------------------------------------------

    def attach(self, link: Link) -> None:
        publisher = self._publisher
        if not publisher._drain_lock.acquire(blocking=False):
            self.loop.call_later(_RETRY_S, self.attach, link)
            return
        try:
            if self.offered is not link:
                return  # detached meanwhile, which closed it
            self.offered = None
            if publisher._loop_flusher is not self:
                link.close()
                return
            try:
                self.loop.add_reader(link, self._on_readable)
            except (NotImplementedError, RuntimeError):  # a loop without add_reader
                link.close()
                publisher._loop_capable = False
                return
            self.link = link
            self._send()
        finally:
            publisher._drain_lock.release()

    def _arm(self, now: bool) -> None:
        if self._armed >= (2 if now else 1):
            return
        if now:
            self.loop.call_soon(self._drain)
        else:
            self.loop.call_later(self._linger, self._drain)
        self._armed = 2 if now else 1

    def _drain(self) -> None:
        self._armed = 0
        self._locked(self._send)

    def _on_readable(self) -> None:
        self._locked(self._read)

    def _on_writable(self) -> None:
        self._locked(self._send)

    def _locked(self, step: object) -> None:
        publisher = self._publisher
        if not publisher._drain_lock.acquire(blocking=False):
            self.loop.call_later(_RETRY_S, self._locked, step)
            return
        try:
            if self.link is not None and publisher._loop_flusher is self:
                step()  # type: ignore[operator]
        finally:
            publisher._drain_lock.release()

    def _send(self) -> None:
        link = self.link
        assert link is not None
        publisher = self._publisher
        try:
            if link.unsent:
                link.write(b"")
            while publisher._buffer and len(self._in_flight) < MAX_IN_FLIGHT and not link.unsent:
                batch = publisher._take_batch()
                if not self._in_flight:
                    self._oldest_sent = time.monotonic()
                self._in_flight.append(_Sent(batch))
                link.write(packed(batch))
        except OSError as exc:
            self._fail(exc)
            return
        if bool(link.unsent) != self._writing:  # the socket was full: wait until it drains
            self._writing = not self._writing
            if self._writing:
                self.loop.add_writer(link, self._on_writable)
            else:
                self.loop.remove_writer(link)
        # Left in the buffer means too many batches in flight or a full socket: the
        # next reply (or the writer) drains again, so no wake-up needs scheduling.
        self._armed = 2 if publisher._buffer else 0

    def _read(self) -> None:
        assert self.link is not None
        try:
            replies = self.link.read()
        except (OSError, LinkError) as exc:
            self._fail(exc)
            return
        self._answered(replies)
        # Only a drain that waited for these replies goes now; newer events wait for
        # their linger, or every reply would send a batch of one or two events.
        if self._armed == 2 and self._publisher._buffer and self.link is not None:
            self._send()

    def _answered(self, replies: list[Reply]) -> None:
        """Count replies against the batches in flight, oldest first."""
        publisher = self._publisher
        for reply in replies:
            sent = self._in_flight[0]
            sent.answered += 1
            if isinstance(reply, hiredis.ReplyError):
                sent.refused += 1
                sent.error = f"ResponseError: {reply}"
            if sent.answered == len(sent.batch):
                self._in_flight.popleft()
                self._oldest_sent = time.monotonic()
                publisher._sent(sent.answered, sent.refused, sent.error)

    def _fail(self, exc: BaseException) -> None:
        link = self._release_link()
        if link is not None:
            link.close()
        self._put_back(exc)
        self._publisher._wakeup.set()  # the thread drains, with its backoff, and re-links

    def _put_back(self, exc: BaseException) -> None:
        """Unanswered entries go back to the buffer's front; answered ones are counted."""
        unsent: list[Entry] = []
        for sent in self._in_flight:
            if sent.answered:
                self._publisher._sent(sent.answered, sent.refused, sent.error)
            unsent += sent.batch[sent.answered :]
        self._in_flight.clear()
        if unsent:
            self._publisher._on_failure(unsent, exc)

    def _release_link(self) -> Link | None:
        link, self.link = self.link, None
        self._writing = False
        if link is not None and not self.loop.is_closed():
            self.loop.remove_reader(link)
            self.loop.remove_writer(link)
        return link


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # closed meanwhile
        return False
    return True
