"""The app-side publisher: a bounded buffer drained by one background flusher.

``publish()`` is the hot path: it appends to a deque and at most wakes the
flusher. It never blocks on the network and never raises. The flusher drains
the buffer in batches (by size, or after a short linger) with one pipelined
``XADD ... MAXLEN ~`` round trip per batch. It is a daemon thread with its own
Redis client, except while the app publishes from a running event loop: then
the loop drains it (:mod:`bus.producer.loop_flusher`), so that no other thread
takes the GIL from the app, and the thread only watches that the loop still
runs. One drainer at a time, so each partition keeps its order.

When Redis is slow or down the buffer fills up to ``buffer_size`` events or
``buffer_bytes`` encoded bytes, whichever comes first, and then the drop
policy applies: ``oldest`` (default) discards the oldest buffered event so
that what is published when Redis returns is the most recent state; ``newest``
refuses the incoming event. Drops are counted. The flusher backs off while
Redis is unreachable and resumes by itself.

Fork safety: after ``fork()`` the child gets an empty buffer, a new client and
a new flusher thread (the parent keeps and flushes its own events). At exit the
buffer is flushed within ``close_timeout_s`` (by the thread: the app's loop is
closed by then).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any

import redis

from bus.keys import Keys
from bus.producer.loop_flusher import WATCH_EVERY_S, LoopFlusher
from bus.producer.resp import Entry, xadd_head
from bus.producer.routing import PartlySent
from bus.producer.sender import BatchSender, Refused
from bus.producer.stats import PublisherStats, leave_stats, stats_command
from bus.settings import Settings

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 1.0
_STATS_EVERY_S = 5.0
_SOCKET_TIMEOUT_S = 5
_CONNECT_TIMEOUT_S = 2
_running_loop = asyncio._get_running_loop  # None outside a loop, and cheap: a C call


class Publisher:
    """Buffers encoded events and ships them to the partitioned event streams.

    Pass ``redis=`` to use a client of your own (fakeredis for the embedded
    mode); otherwise one is made from ``settings.redis_url``. Use
    :meth:`shared` to get the one publisher of this process for some settings.
    """

    def __init__(self, *, settings: Settings, redis: redis.Redis | None = None) -> None:
        self.settings = settings
        self._injected = redis
        keys = Keys(settings.prefix, settings.partitions)
        self._heads = [
            xadd_head(keys.events(p), settings.stream_maxlen) for p in range(settings.partitions)
        ]
        self._keys = keys
        self._closed = False
        self._reset()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _call(ref, "_reset"))
        atexit.register(_call, ref, "close")

    _loop_flusher: LoopFlusher | None
    _wakeup: threading.Event

    _shared: dict[tuple[str, str, int], Publisher] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, settings: Settings) -> Publisher:
        """The process-wide publisher for these settings (created on first use)."""
        key = (settings.redis_url, settings.prefix, settings.partitions)
        with cls._shared_lock:
            publisher = cls._shared.get(key)
            if publisher is None or publisher._closed:
                publisher = cls._shared[key] = cls(settings=settings)
            return publisher

    # -- hot path ---------------------------------------------------------

    def publish(self, partition: int, payload: bytes) -> None:
        """Queue one encoded event for ``partition``. Never blocks, never raises."""
        buffer = self._buffer
        size = len(payload)
        # Held for a few list operations only, never across I/O: the byte count
        # is shared with the flusher thread.
        with self._lock:
            if (
                len(buffer) >= self.settings.buffer_size
                or self._buffered_bytes + size > self.settings.buffer_bytes
            ) and not self._make_room(size):
                self._dropped += 1
                return
            buffer.append((self._heads[partition], payload))
            self._buffered_bytes += size
            depth = len(buffer)
        if depth == 1 or depth >= self.settings.batch_size:
            self._wake(depth >= self.settings.batch_size)

    def _wake(self, now: bool) -> None:
        """Start a batch: on the bound loop if there is one, else on the thread."""
        flusher = self._loop_flusher
        if flusher is None and self._loop_capable:
            loop = _running_loop()
            if loop is not None:
                flusher = self._bind(loop)
        if (flusher is None or not flusher.wake(now)) and not self._wakeup.is_set():
            self._wakeup.set()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> LoopFlusher:
        with self._lock:
            if self._loop_flusher is None:
                self._loop_flusher = LoopFlusher(self, loop)
            flusher = self._loop_flusher
        self._wakeup.set()  # the thread opens the loop's link
        return flusher

    def _make_room(self, size: int) -> bool:
        """Drop the oldest events until one of ``size`` bytes fits (drop policy ``oldest``)."""
        if not self._drop_oldest or size > self.settings.buffer_bytes:
            return False
        buffer = self._buffer
        while buffer and (
            len(buffer) >= self.settings.buffer_size
            or self._buffered_bytes + size > self.settings.buffer_bytes
        ):
            self._buffered_bytes -= len(buffer.popleft()[1])
            self._dropped += 1
        return True

    # -- control ------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is sent; False if the time ran out."""
        deadline = time.monotonic() + (
            self.settings.close_timeout_s if timeout is None else timeout
        )
        flusher = self._loop_flusher
        if flusher is not None and _running_loop() is flusher.loop:
            # Called on the loop, which cannot drain while we wait: the thread takes over.
            flusher.detach(max(0.0, deadline - time.monotonic()))
        while self._buffer or self._in_flight or self._loop_in_flight():
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            flusher = self._loop_flusher
            if flusher is None or not flusher.wake(now=True):
                self._wakeup.set()
            time.sleep(0.001)
        return True

    def _loop_in_flight(self) -> bool:
        flusher = self._loop_flusher
        return flusher is not None and flusher.in_flight

    def close(self, timeout: float | None = None) -> None:
        """Flush within ``timeout`` (default ``close_timeout_s``), then stop."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        flusher = self._loop_flusher
        if flusher is not None:
            flusher.detach(0.0)
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if flusher is not None and flusher.holds_link and not self._thread.is_alive():
            # The first detach found the thread mid-send (or opening a link), and the
            # thread stopped without its next check: close the link now, not at GC.
            flusher.detach(0.0)
        self._sender.close_client()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> PublisherStats:
        return PublisherStats(
            published=self._published,
            dropped=self._dropped + self._dropped_by_flusher,
            errors=self._errors,
            buffer_depth=len(self._buffer),
            buffer_bytes=self._buffered_bytes,
            reconnects=self._reconnects,
            batches=self._batches,
            connected=self._connected,
            last_error=self._last_error,
        )

    @property
    def source(self) -> str:
        """This process's identity in event ``source`` fields and status."""
        return self._source

    # -- flusher --------------------------------------------------------------

    def _reset(self) -> None:
        """(Re)create all per-process state; runs at init and in a forked child."""
        inherited = getattr(self, "_loop_flusher", None)
        if inherited is not None:
            inherited.abandon()  # the parent's link: its socket is the parent's to use
        inherited_sender = getattr(self, "_sender", None)
        if inherited_sender is not None:
            # This process's descriptor only; the parent keeps its own.
            inherited_sender.link.close()
        self._sender = BatchSender(
            self.settings,
            self._keys,
            self._heads,
            client=self._injected,
            connect_timeout_s=_CONNECT_TIMEOUT_S,
            reply_timeout_s=_SOCKET_TIMEOUT_S,
        )
        self._buffer: deque[Entry] = deque()
        self._buffered_bytes = 0
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        """Held by whoever sends (thread or loop), so that one drainer runs at a time."""
        self._loop_flusher = None
        self._loop_capable = False
        """Whether a loop may drain: set once the thread's client shows a standalone Redis."""
        self._drop_oldest = self.settings.drop_policy == "oldest"
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        # Drops are counted apart per thread: an unlocked += shared by two
        # threads could lose counts.
        self._published = self._dropped = self._dropped_by_flusher = self._errors = 0
        self._reconnects = self._batches = 0
        self._in_flight = False
        self._connected = False
        self._failing = False
        self._last_error = ""
        self._source = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._thread = threading.Thread(target=self._run, name="lcbus-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        linger = self.settings.flush_interval_ms / 1000
        last_stats = 0.0
        try:
            while not self._stopping.is_set():
                bound = self._loop_flusher is not None
                self._wakeup.wait(timeout=WATCH_EVERY_S if bound else _STATS_EVERY_S)
                self._wakeup.clear()
                if (flusher := self._loop_flusher) is not None:
                    flusher.watch()
                if linger and 0 < len(self._buffer) < self.settings.batch_size and self._drains():
                    time.sleep(linger)  # the time bound: let a batch form
                while self._buffer and not self._stopping.is_set() and self._drains():
                    if not self._drain_once():
                        self._stopping.wait(self._backoff())
                if time.monotonic() - last_stats > _STATS_EVERY_S:
                    last_stats = time.monotonic()
                    self._report_stats()
        finally:
            self._sender.link.close()  # also after a send that outlived close()

    def _drains(self) -> bool:
        """Whether the thread is the drainer (no loop flusher holding a link)."""
        flusher = self._loop_flusher
        return flusher is None or flusher.link is None

    def _take_batch(self) -> list[Entry]:
        buffer = self._buffer
        with self._lock:
            count = min(len(buffer), self.settings.batch_size)
            batch = [buffer.popleft() for _ in range(count)]
            self._buffered_bytes -= sum(len(payload) for _, payload in batch)
        return batch

    def _drain_once(self) -> bool:
        """Send one batch; False (batch put back) when Redis failed."""
        with self._drain_lock:
            return self._drains() and self._send_one()

    def _send_one(self) -> bool:
        self._in_flight = True
        try:
            batch = self._take_batch()
            if not batch:
                return True
            try:
                refused, error = self._send(batch)
            except PartlySent as partial:
                if partial.refused:
                    self._refused(partial.refused, partial.error)
                self._published += len(batch) - len(partial.unsent) - partial.refused
                self._on_failure(partial.unsent, partial.cause)
                return False
            except Exception as exc:  # the flusher must outlive any failure, ours included
                self._on_failure(batch, exc)
                return False
            # Counted before in_flight clears, so that flush() never returns
            # before the stats show what it waited for.
            self._sent(len(batch), refused, error)
        finally:
            self._in_flight = False
        return True

    def _sent(self, count: int, refused: int = 0, error: str = "") -> None:
        """A batch of ``count`` entries answered, ``refused`` of them with an error."""
        if refused:
            self._refused(refused, error)
        self._published += count - refused
        self._batches += 1
        if self._failing:
            self._failing = False
            self._reconnects += 1
            log.warning("lcbus publisher reconnected to Redis; sending resumed")
        self._connected = True

    def _send(self, batch: list[Entry]) -> Refused:
        """One round trip (see bus.producer.sender); what Redis refused."""
        sender = self._sender
        if sender.client is None:
            sender.ensure_client()
            # Decided once: a loop flusher whose link fails turns it off for good.
            self._loop_capable = self.settings.loop_flusher and sender.link_capable
        return sender.send(batch)

    def _refused(self, count: int, error: str) -> None:
        # Redis answered, but refused some entries (say, a key that is not a
        # stream): resending would fail the same way, so they count as dropped.
        self._dropped_by_flusher += count
        self._errors += 1
        self._last_error = error

    def _on_failure(self, batch: list[Entry], exc: BaseException) -> None:
        # Put the batch back in front, in order, then apply the drop policy to
        # whatever exceeds the bound: the same outcome as if publish() had dropped.
        buffer = self._buffer
        with self._lock:
            buffer.extendleft(reversed(batch))
            self._buffered_bytes += sum(len(payload) for _, payload in batch)
            trim = buffer.popleft if self._drop_oldest else buffer.pop
            while buffer and (
                len(buffer) > self.settings.buffer_size
                or self._buffered_bytes > self.settings.buffer_bytes
            ):
                self._buffered_bytes -= len(trim()[1])
                self._dropped_by_flusher += 1
        # Counted once the batch is back: stats that show the error show its batch
        # in the buffer too, never in between.
        self._errors += 1
        self._connected = False
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not self._failing:
            self._failing = True
            log.warning("lcbus publisher cannot reach Redis (%s); buffering", self._last_error)

    def _backoff(self) -> float:
        return min(_MAX_BACKOFF_S, 0.05 * 2.0 ** min(self._errors, 5))

    def _report_stats(self) -> None:
        if not self._connected:
            return
        key = self._keys.publisher(self._source)
        sender = self._sender
        leave_on_link = sender.link_capable and self._leave_stats_on_link(key)
        if not leave_on_link and sender.client is not None:
            # No link of the thread's (a loop drains, or TLS, a cluster, an injected
            # client): redis-py's client, whose connection opens on first use.
            leave_stats(sender.client, key, self.stats)

    def _leave_stats_on_link(self, key: str) -> bool:
        """The stats as one more command on the thread's link, so that a sync
        publisher holds one connection; False when it has no link at the moment."""
        if not self._drain_lock.acquire(timeout=_CONNECT_TIMEOUT_S):
            return True  # the thread is mid-send: left to the next report
        try:
            return self._sender.link.command(stats_command(key, self.stats))
        finally:
            self._drain_lock.release()


def _call(ref: weakref.ref[Publisher], method: str) -> Any:
    target = ref()
    if target is not None:
        return getattr(target, method)()
    return None
