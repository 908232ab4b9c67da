"""Free loopback ports for the servers the demo, the tests and the benchmarks start.

The usual trick, bind to port 0 and hand on the number, picks from the
kernel's ephemeral range. Between the pick and the child's own bind, any
process's bind to port 0 or outgoing connection may take that port, and the
one waiting for the child then talks to whatever answers there (seen once:
the demo's frontend URL was answered 404 by another server). Below the range
only an explicit bind can take a port, and one process never hands the same
port out twice.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20_000
"""Well under the ephemeral range, above the ports services usually claim."""
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing is bound to, outside the ephemeral range."""
    lowest, highest = _outside_ephemeral_range()
    for _ in range(1000):
        port = random.randint(lowest, highest)
        if port not in _handed_out and bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {lowest}-{highest}")


def _outside_ephemeral_range() -> tuple[int, int]:
    """The ports from LOWEST up to the ephemeral range, or above it when that leaves too few."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32_768, 60_999  # the Linux defaults
    if low - LOWEST >= 1000:
        return LOWEST, low - 1
    if 65_535 - high >= 1000:
        return high + 1, 65_535
    return LOWEST, 65_535  # the ephemeral range is nearly everything: take the risk


def bindable(port: int) -> bool:
    """Whether a loopback TCP socket can be bound to ``port`` now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
