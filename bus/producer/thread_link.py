"""The publisher thread's own :class:`~bus.producer.link.Link`, for ``redis://`` and ``unix://``.

The replies of a batch are parsed in one go by hiredis, where redis-py's
connection reads them one call each: a batch of 100 cost the thread 286 µs of
CPU through redis-py and 115 µs here (60 µs and 44 µs for one entry), all of it
time the thread holds the app's GIL. A link that fails or stops answering is
closed, and the next use opens a new one. A link kept from an earlier use that
turns out closed before answering anything (Redis drops clients idle past its
``timeout``) is replaced at once and the batch sent again, as redis-py retries
a pooled connection.
"""

from __future__ import annotations

import time

from bus.producer.link import Link, Reply, open_link
from bus.producer.resp import Entry, packed


class ThreadLink:
    """One lazily opened link; used only under the publisher's drain lock."""

    def __init__(self, url: str, *, connect_timeout_s: float, reply_timeout_s: float) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._link: Link | None = None

    @property
    def is_open(self) -> bool:
        return self._link is not None

    def send(self, batch: list[Entry]) -> tuple[list[Reply], bool]:
        """The batch's replies (all of them, or those that came before the link failed),
        and whether the link closed rather than went silent. Opening may raise OSError."""
        reused = self._link is not None
        replies, closed = self._round_trip(packed(batch), len(batch))
        if closed and not replies and reused:
            replies, closed = self._round_trip(packed(batch), len(batch))
        return replies, closed

    def command(self, data: bytes) -> bool:
        """One command on the link if it is open (False if not); any failure drops it."""
        if self._link is None:
            return False
        try:
            self._round_trip(data, 1)
        except Exception:  # the flusher must outlive any failure
            self.close()
        return True

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _round_trip(self, data: bytes, replies_due: int) -> tuple[list[Reply], bool]:
        link = self._link
        if link is None:
            link = self._link = open_link(self.url, timeout=self.connect_timeout_s)
        started = time.monotonic()
        try:
            link.write(data)
            replies = link.settle(replies_due, self.reply_timeout_s)
        except TimeoutError:  # a send blocked that long: Redis is not reading
            self.close()
            return [], False
        except OSError:
            self.close()
            return [], True
        except BaseException:
            self.close()
            raise
        if len(replies) < replies_due:
            self.close()
            return replies, time.monotonic() - started < self.reply_timeout_s
        return replies, False
