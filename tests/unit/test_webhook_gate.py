"""The in-process line for an endpoint's own concurrency limit (pure asyncio)."""

from __future__ import annotations

import asyncio

from bus.webhooks.gate import LocalGates


async def test_waiters_take_freed_slots_in_order_and_the_line_is_bounded() -> None:
    gates = LocalGates(max_waiting=2, wait_s=5)
    first = await gates.enter("ep", 1)
    assert first is not None
    order: list[int] = []

    async def wait(n: int) -> None:
        hold = await gates.enter("ep", 1)
        assert hold is not None
        order.append(n)
        hold.release()

    waiters = [asyncio.create_task(wait(n)) for n in (1, 2)]
    await asyncio.sleep(0)
    assert gates.waiting == 2
    # The line is full: a third attempt is turned away at once, with a turn to come back at.
    assert await gates.enter("ep", 1) is None
    assert gates.defer_s("ep") > 0
    # Another endpoint does not wait behind this one.
    other = await gates.enter("other", 1)
    assert other is not None
    first.release()
    await asyncio.gather(*waiters)
    assert order == [1, 2] and gates.waiting == 0


async def test_a_waiter_gives_up_after_wait_s() -> None:
    gates = LocalGates(max_waiting=10, wait_s=0.05)
    held = await gates.enter("ep", 1)
    assert held is not None
    assert await gates.enter("ep", 1) is None
    assert gates.waiting == 0


async def test_turned_away_attempts_book_successive_turns() -> None:
    gates = LocalGates(max_waiting=0, wait_s=1)
    assert gates.defer_s("unknown") == 0.0
    await gates.enter("ep", 2)
    turns = [gates.defer_s("ep") for _ in range(4)]
    assert turns == sorted(turns) and len(set(turns)) == 4
