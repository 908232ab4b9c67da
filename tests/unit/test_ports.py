import random
import socket

import pytest

from bus.demo import ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, _ = (int(part) for part in ports.EPHEMERAL_RANGE.read_text().split())
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    assert all(ports.LOWEST <= port < low for port in picked)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked[-1]))


def test_a_port_in_use_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports.free_port()))
        busy_port = busy.getsockname()[1]
        ports._handed_out.discard(busy_port)
        draws = [busy_port, busy_port]

        def draw(low: int, high: int) -> int:
            return draws.pop() if draws else random.Random().randint(low, high)

        monkeypatch.setattr(ports.random, "randint", draw)
        assert ports.free_port() != busy_port
        assert not draws
