"""Helpers shared by the benchmarks: Redis under a throwaway prefix, percentiles."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from bus.settings import DEFAULT_REDIS_URL

REDIS_URL = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)


@contextmanager
def throwaway_prefix(name: str) -> Iterator[str]:
    """A fresh key prefix whose keys are deleted afterwards."""
    prefix = f"lcbus-bench-{name}-{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        client.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def report(figures: dict[str, Any]) -> None:
    """Print the benchmark's figures as the last line, one JSON object."""
    print(json.dumps(figures, sort_keys=False), flush=True)
