"""The publisher's batches on a Redis Cluster: one packed pipeline per master.

A batch holds XADDs for several partitions, whose streams live on different
masters. :class:`ClusterSender` groups the batch by the master that owns each
partition's slot (from redis-py's slot map), writes every group's packed
commands first and then reads the replies, so the masters work in parallel
and the flusher pays one round trip, not one per node.

Redirections are resent, never dropped: a ``MOVED`` reply (the slot has a new
owner: a finished migration or a failover) refreshes the slot map and the
entry goes again to the new owner; an ``ASK`` reply (the slot is migrating
and this stream already left) sends it once to the node named, preceded by
``ASKING``; ``TRYAGAIN`` and ``CLUSTERDOWN`` send it again after the
publisher's backoff. Entries of one partition stay in order: a partition has
one owner per round, and what one round could not place goes out in the next,
in buffer order. A node that cannot be reached fails only its own entries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)

from bus.keys import key_slot
from bus.producer.resp import Entry

log = logging.getLogger(__name__)


_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_MAX_ROUNDS = 5


_Item = tuple[int, Entry, "ClusterNode | None"]
"""(position in the batch, the entry, the ASK target to send it to, if any)."""


@dataclass(slots=True)
class ClusterSend:
    refused: int = 0
    """Entries Redis answered with an error that resending cannot fix."""
    last_error: str = ""
    unsent: list[tuple[int, Entry]] = field(default_factory=list)
    """Entries to send again later (node unreachable, cluster down, too many redirects)."""
    failure: BaseException | None = None

    def unsent_in_order(self) -> list[Entry]:
        """The unsent entries in batch order (so each partition keeps its order)."""
        return [entry for _, entry in sorted(self.unsent, key=lambda item: item[0])]


class PartlySent(Exception):
    """Some of a batch's entries reached Redis; ``unsent`` go back to the buffer.

    ``refused`` of the answered ones were refused, the last with ``error``.
    """

    def __init__(self, unsent: list[Entry], refused: int, error: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.unsent, self.refused, self.error, self.cause = unsent, refused, error, cause


class ClusterSender:
    """Sends packed XADD batches to a cluster's masters; see the module docstring."""

    def __init__(self, client: Any, heads: Sequence[bytes], keys: Sequence[str]) -> None:
        self._client: RedisCluster = client
        self._slot_of_head = {head: key_slot(key) for head, key in zip(heads, keys, strict=True)}

    def send(self, batch: list[Entry]) -> ClusterSend:
        result = ClusterSend()
        pending: list[_Item] = [(index, entry, None) for index, entry in enumerate(batch)]
        for _ in range(_MAX_ROUNDS):
            if not pending:
                return result
            pending = self._round(pending, result)
        result.unsent += [(index, entry) for index, entry, _ in pending]
        if result.failure is None:
            result.failure = ConnectionError("entries still redirected after several rounds")
        return result

    def _round(self, pending: list[_Item], result: ClusterSend) -> list[_Item]:
        """Send each entry to its owner (or to the ASK target given); return the redirected."""
        groups: dict[str, tuple[ClusterNode, bool, list[_Item]]] = {}
        owners: dict[bytes, ClusterNode] = {}  # one slot-map lookup per partition and round
        for item in pending:
            try:
                node = (
                    item[2]
                    or owners.get(item[1][0])
                    or owners.setdefault(item[1][0], self._owner(item[1][0]))
                )
            except (SlotNotCoveredError, ClusterDownError) as exc:
                result.unsent.append((item[0], item[1]))
                result.failure = exc
                continue
            asking = item[2] is not None
            groups.setdefault(f"{node.name}/{asking}", (node, asking, []))[2].append(item)
        sent = []
        for node, asking, items in groups.values():
            conn, pool = self._write(node, asking, items, result)
            if conn is not None:
                sent.append((asking, items, conn, pool))
        redirected: list[_Item] = []
        for asking, items, conn, pool in sent:
            redirected += self._read(conn, pool, asking, items, result)
        return redirected

    def _owner(self, head: bytes) -> ClusterNode:
        node: ClusterNode = self._client.nodes_manager.get_node_from_slot(self._slot_of_head[head])
        return node

    def _write(
        self, node: ClusterNode, asking: bool, items: list[_Item], result: ClusterSend
    ) -> tuple[Any, Any]:
        parts: list[bytes] = []
        for _, (head, payload), _ in items:
            if asking:
                parts.append(_ASKING)
            parts += (head, b"$%d\r\n" % len(payload), payload, b"\r\n")
        pool = self._client.get_redis_connection(node).connection_pool
        try:
            conn = pool.get_connection()
            conn.send_packed_command([b"".join(parts)], check_health=False)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._lost(None, pool, exc, items, result)
            return None, None
        return conn, pool

    def _read(
        self, conn: Any, pool: Any, asking: bool, items: list[_Item], result: ClusterSend
    ) -> list[_Item]:
        redirected: list[_Item] = []
        for position, (index, entry, _) in enumerate(items):
            try:
                if asking:
                    conn.read_response()
                conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # Replies out of step: what was not answered goes again (it may have
                # landed: at-least-once, consumers recognise a repeated event).
                self._lost(conn, pool, exc, items[position:], result)
                return redirected
            except MovedError as exc:
                self._client.nodes_manager.move_slot(exc)
                redirected.append((index, entry, None))
            except AskError as exc:
                target = self._client.nodes_manager.get_node(exc.host, exc.port)
                if target is None:
                    self._refresh()
                    target = self._client.nodes_manager.get_node(exc.host, exc.port)
                redirected.append((index, entry, target))
            except (TryAgainError, ClusterDownError) as exc:
                result.unsent.append((index, entry))
                result.failure = exc
            except ResponseError as exc:
                result.refused += 1
                result.last_error = f"ResponseError: {exc}"
        pool.release(conn)
        return redirected

    def _lost(
        self, conn: Any, pool: Any, exc: BaseException, items: list[_Item], result: ClusterSend
    ) -> None:
        if conn is not None:
            conn.disconnect()
            pool.release(conn)
        result.unsent += [(index, entry) for index, entry, _ in items]
        result.failure = exc
        self._refresh()  # the node may be gone, or its slots moved to another

    def _refresh(self) -> None:
        try:
            self._client.nodes_manager.initialize()
        except redis.RedisError as exc:  # every node unreachable: retried on the next batch
            log.debug("cluster slot map refresh failed: %s", exc)
