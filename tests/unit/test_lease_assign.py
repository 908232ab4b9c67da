"""Which partitions a replica owns, given the group's members."""

from __future__ import annotations

from bus.runtime.lease import assign


def test_assign_spreads_partitions_and_ignores_strangers() -> None:
    members = ["b", "a", "c"]
    owned = [assign(8, members, m) for m in ("a", "b", "c")]
    assert sorted(p for o in owned for p in o) == list(range(8))
    assert owned[0] == {0, 3, 6}
    assert assign(8, members, "zz") == frozenset()
