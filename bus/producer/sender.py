"""How the flusher thread sends a batch: one round trip, by the way the Redis URL allows.

- ``redis://`` and ``unix://``: the thread's own link
  (:mod:`bus.producer.thread_link`), whose replies hiredis parses at once.
- A cluster: one packed pipeline per master (:mod:`bus.producer.routing`).
- TLS, or a client the app passed in: one of redis-py's pooled connections
  (:func:`bus.producer.resp.send_batch`).

A send returns what Redis refused (entries it answered with an error, which a
resend would not fix) and raises :class:`PartlySent` when only some entries
were answered: the publisher counts the answered ones and buffers the rest again.
"""

from __future__ import annotations

import hiredis
import redis

from bus.connect import is_cluster_client, sync_client
from bus.keys import Keys
from bus.producer.link import loop_capable
from bus.producer.resp import Entry, send_batch
from bus.producer.routing import ClusterSender, PartlySent
from bus.producer.thread_link import ThreadLink
from bus.settings import Settings

Refused = tuple[int, str]
"""How many entries of a batch Redis refused, and its last error ("" for none)."""

NOTHING_REFUSED: Refused = (0, "")


class BatchSender:
    """The thread's client, link and cluster router; used only under the drain lock."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        heads: list[bytes],
        *,
        client: redis.Redis | None,
        connect_timeout_s: float,
        reply_timeout_s: float,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._heads = heads
        self._injected = client
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self.client: redis.Redis | None = client
        """redis-py's client, made on the first send (or the app's own)."""
        self.link_capable = False
        """Whether the Redis takes a link of ours: standalone, ``redis://`` or ``unix://``,
        no client passed in. Known once the client exists."""
        self.link = ThreadLink(
            settings.redis_url, connect_timeout_s=connect_timeout_s, reply_timeout_s=reply_timeout_s
        )
        self._router: ClusterSender | None = None

    def ensure_client(self) -> redis.Redis:
        client = self.client
        if client is None:
            client = self.client = sync_client(
                self._settings,
                socket_timeout=self._reply_timeout_s,
                socket_connect_timeout=self._connect_timeout_s,
            )
            self.link_capable = (
                self._injected is None
                and loop_capable(self._settings.redis_url)
                and not is_cluster_client(client)
            )
        return client

    def send(self, batch: list[Entry]) -> Refused:
        """The batch in one round trip (one per master on a cluster)."""
        client = self.ensure_client()
        if is_cluster_client(client):
            return self._send_to_cluster(client, batch)
        if self.link_capable:
            return self._send_on_link(batch)
        return send_batch(client, batch) or NOTHING_REFUSED

    def _send_on_link(self, batch: list[Entry]) -> Refused:
        replies, closed = self.link.send(batch)
        errors = [reply for reply in replies if isinstance(reply, hiredis.ReplyError)]
        refused = (len(errors), f"ResponseError: {errors[-1]}") if errors else NOTHING_REFUSED
        if len(replies) < len(batch):
            how = (
                "closed the connection"
                if closed
                else f"did not answer within {self._reply_timeout_s:g} s"
            )
            cause = ConnectionError(
                f"Redis answered {len(replies)} of {len(batch)} entries, then {how}"
            )
            raise PartlySent(batch[len(replies) :], *refused, cause)
        return refused

    def _send_to_cluster(self, client: redis.Redis, batch: list[Entry]) -> Refused:
        if self._router is None:
            streams = [self._keys.events(p) for p in range(self._settings.partitions)]
            self._router = ClusterSender(client, self._heads, streams)
        sent = self._router.send(batch)
        refused = (sent.refused, sent.last_error) if sent.refused else NOTHING_REFUSED
        if sent.failure is not None:
            raise PartlySent(sent.unsent_in_order(), *refused, sent.failure)
        return refused

    def close_client(self) -> None:
        """Close the client made here (the link is the flusher thread's: it closes it when
        it stops, also after a send that outlived ``Publisher.close``)."""
        if self._injected is None and self.client is not None:
            self.client.close()
