"""One client's command state on the fake server: fakeredis' ``FakeSocket``, fixed for the bus.

- A blocking ``XREADGROUP`` blocks until an entry arrives, as on Redis.
  fakeredis 2.40 answers it empty at once (with ``COUNT``), or takes the
  entries into the pending list and still answers empty (without).
- A blocked ``XREAD`` or ``XREADGROUP`` wakes only for a write to a stream it
  reads. fakeredis wakes every blocked command on every write to any key: with
  a worker's reader blocked on each partition of each group (24 in the demo),
  each write woke them all to find nothing, and the one that had an entry
  waited its turn behind them for the lock.
- A reply queued from another thread (pub/sub messages) calls :attr:`wake`,
  so the connection's handler writes it at once.
- ``INFO`` exists (arq's workers log it at start-up).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fakeredis._commands import command
from fakeredis._core._database import Database
from fakeredis._socket._fakesocket import FakeSocket

_INFO = (
    b"# Server\r\nredis_version:7.4.0\r\nredis_mode:standalone\r\nos:fakeredis\r\n"
    b"# Clients\r\nconnected_clients:1\r\n"
    b"# Memory\r\nused_memory:0\r\nused_memory_human:0B\r\n"
)


@command((), (bytes,), name="info")
def info(self: FakeSocket, *sections: bytes) -> bytes:
    """A minimal INFO: arq's workers log it at start-up and fakeredis has none."""
    return _INFO


# fakeredis dispatches a command to the FakeSocket method its signature names.
# The signature records the function's name, so the method must be called ``info``.
FakeSocket.info = info  # type: ignore[attr-defined]


class StreamWaiters:
    """The stream reads blocked on each key of one database, woken by writes to that key.

    Installed on the database the first time a read blocks there: it takes
    over the database's key-change notification (WATCH and fakeredis' own
    blocked commands are still told of every change, as before).
    """

    def __init__(self, db: Database) -> None:
        self._by_key: dict[bytes, set[threading.Condition]] = {}
        self._watches = db._watches
        self._wake_others = db.wake_all
        # Instance attributes: the database's own calls (CommandItem.writeback,
        # CLIENT UNBLOCK) find these before the class's methods.
        db.notify_watch = self.key_changed  # type: ignore[method-assign]
        db.wake_all = self.wake_all  # type: ignore[method-assign]

    @classmethod
    def of(cls, db: Database) -> StreamWaiters:
        waiters: StreamWaiters | None = getattr(db, "_lcbus_stream_waiters", None)
        if waiters is None:
            waiters = cls(db)
            db._lcbus_stream_waiters = waiters  # type: ignore[attr-defined]
        return waiters

    def add(self, keys: Iterable[bytes], waiter: threading.Condition) -> None:
        for key in keys:
            self._by_key.setdefault(key, set()).add(waiter)

    def discard(self, keys: Iterable[bytes], waiter: threading.Condition) -> None:
        for key in keys:
            waiting = self._by_key.get(key)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._by_key[key]

    def key_changed(self, key: bytes) -> None:
        """What ``Database.notify_watch`` did, but the stream reads of other keys sleep on."""
        for sock in self._watches.get(key, set()):
            sock.notify_watch()
        self._wake_others()
        for waiter in self._by_key.get(key, ()):
            waiter.notify()

    def wake_all(self) -> None:
        """Every blocked command looks again (CLIENT UNBLOCK)."""
        self._wake_others()
        for waiting in self._by_key.values():
            for waiter in waiting:
                waiter.notify()


def _stream_keys(args: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The keys of ``... STREAMS key [key ...] id [id ...]`` (none when malformed)."""
    for index, arg in enumerate(args):
        if arg.upper() == b"STREAMS":
            rest = args[index + 1 :]
            return tuple(rest[: len(rest) // 2])
    return ()


class BusSocket(FakeSocket):
    """fakeredis' per-connection state with blocking stream reads and push wake-ups."""

    wake: Callable[[], None] | None = None
    """Called when a reply is queued from a thread other than :attr:`owner`."""
    owner: int = 0
    """The thread id of the connection's handler: its own replies need no wake-up."""
    _block_keys: tuple[bytes, ...] = ()

    def put_response(self, msg: Any) -> None:
        super().put_response(msg)
        wake = self.wake
        if wake is not None and threading.get_ident() != self.owner:
            wake()

    def xread(self, *args: bytes) -> Any:
        self._block_keys = _stream_keys(args)
        try:
            return super().xread(*args)
        finally:
            self._block_keys = ()

    def xreadgroup(
        self, group_const: bytes, group_name: bytes, consumer_name: bytes, *args: bytes
    ) -> Any:
        self._block_keys = _stream_keys(args)
        try:
            return super().xreadgroup(group_const, group_name, consumer_name, *args)
        finally:
            self._block_keys = ()

    def _xreadgroup(
        self,
        consumer_name: bytes,
        group_params: list[tuple[Any, bytes, bytes]],
        count: int | None,
        noack: bool,
        min_idle_time: int | None,
        first_pass: bool,
    ) -> dict[bytes, Any] | None:
        # fakeredis answers a first pass without COUNT with nothing, after taking the
        # entries: every pass here is a real read.
        read: dict[bytes, Any] | None = super()._xreadgroup(
            consumer_name, group_params, count, noack, min_idle_time, False
        )
        # A read of pending entries (any id but ">") answers at once, as on Redis; a read
        # of new entries that found none returns None, which keeps a blocking read
        # waiting until a write wakes it (fakeredis returned {}, which ended it).
        if any(start != b">" for _, _, start in group_params):
            return read
        return read or None

    def _blocking(
        self,
        timeout: float | None,
        func: Callable[[bool], Any],
        shape: Callable[[Any], Any] | None = None,
    ) -> Any:
        """fakeredis' blocking loop (see ``BaseFakeSocket._blocking``), but a stream read
        waits on a condition of its own that only writes to its streams notify."""
        keys = self._block_keys
        if not keys:
            return super()._blocking(timeout, func, shape)
        ret = func(True)
        if ret is not None or self._in_transaction:
            return ret if shape is None else shape(ret)
        waiters = StreamWaiters.of(self._db)
        # Called with the server's lock held, which the wait releases.
        waiter = threading.Condition(self._server.lock)
        deadline = time.monotonic() + timeout if timeout else None
        waiters.add(keys, waiter)
        self._blocked = True
        self._client_info["flags"] = "b"  # CLIENT LIST shows it blocked, as on Redis
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                if not waiter.wait(remaining):
                    break  # timed out
                if self._unblock_reason is not None:
                    self._take_unblock_reason()
                    break  # CLIENT UNBLOCK ... TIMEOUT: answered like a timeout
                ret = func(False)
                if ret is not None:
                    return ret if shape is None else shape(ret)
            return None if shape is None else shape(None)
        finally:
            waiters.discard(keys, waiter)
            self._blocked = False
            self._unblock_reason = None
            self._update_client_flags()
