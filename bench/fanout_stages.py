"""Where ``bench.fanout``'s latency goes: per-stage times read back from Redis after a run.

Every token carries its send time (``~<time.time_ns()>`` at the handler call),
and two Redis entry ids on its way carry the server's clock (milliseconds, the
same machine's clock): the bus entry id (the publisher's ``XADD``) and the
trace history entry id (the fan-out worker's guarded script, which publishes
the live message in the same step). The client process records the history
id of the SSE frame each token arrived in (its ``id:``). So, per token:

- ``publish``: handler call -> ``XADD`` (the publisher's buffer, linger and
  flush round trip);
- ``worker``: ``XADD`` -> history write + ``PUBLISH`` (the worker's blocking
  read, conversion, coalescing and script round trip);
- ``frontend``: ``PUBLISH`` -> client parse (the frontend's pub/sub read, hub
  dispatch, per-client queue, SSE write, and the client process's read).

Nothing is measured while the run goes: the entries are read once it is
over. Entry ids have millisecond resolution, so each stage's figures are
within about 1 ms (half a millisecond is added to an id's time as the
midpoint estimate); the percentiles over many tokens are what to compare.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from bus.keys import ENTRY_FIELD, HISTORY_PAYLOAD, Keys

_TOKEN = re.compile(rb"~(\d+)")
_PAGE = 10_000
_MS = 1_000_000


def _entries(client: redis.Redis, key: str) -> Iterator[tuple[int, bytes, dict[bytes, bytes]]]:
    """(entry ms, raw id, fields) of a whole stream, oldest first, read in pages."""
    start = "-"
    while True:
        page: Any = client.xrange(key, min=start, max="+", count=_PAGE)
        if not page:
            return
        for entry_id, fields in page:
            yield int(entry_id.split(b"-", 1)[0]), entry_id, fields
        start = "(" + page[-1][0].decode()


def stage_times(
    url: str, prefix: str, partitions: int, traces: Iterable[str], tail_ns: list[int]
) -> dict[str, list[int]]:
    """Per-stage latencies (ns) of every token found in the run's streams.

    ``tail_ns`` is the client process's receipt minus history-id time, per token.
    """
    keys = Keys(prefix, partitions)
    client = redis.Redis.from_url(url)
    try:
        xadd_ms: dict[int, int] = {}
        for p in range(partitions):
            for ms, _, fields in _entries(client, keys.events(p)):
                for sent in _TOKEN.findall(fields.get(ENTRY_FIELD, b"")):
                    xadd_ms[int(sent)] = ms
        publish: list[int] = []
        worker: list[int] = []
        for trace in traces:
            for ms, _, fields in _entries(client, keys.history(trace)):
                for raw in _TOKEN.findall(fields.get(HISTORY_PAYLOAD, b"")):
                    sent = int(raw)
                    added = xadd_ms.get(sent)
                    if added is None:
                        continue
                    publish.append(added * _MS + _MS // 2 - sent)
                    worker.append((ms - added) * _MS)
    finally:
        client.close()
    frontend = [t - _MS // 2 for t in tail_ns]
    return {"publish": publish, "worker": worker, "frontend": frontend}


def percentiles(stages: dict[str, list[int]], q: float) -> dict[str, float]:
    """The ``q`` quantile of each stage, in ms."""
    out: dict[str, float] = {}
    for name, values in stages.items():
        ordered = sorted(values)
        out[name] = (
            round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6, 2)
            if ordered
            else float("nan")
        )
    return out
