"""The tests' one way to wait for a condition: poll it until a deadline.

A test that waits for something another process or task does cannot know
when it happens; it polls, and fails with ``what`` once ``within`` seconds
passed. The check may itself raise to fail at once (a child process died).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.05


def wait_until(
    check: Callable[[], object],
    *,
    within: float = 60.0,
    what: str = "condition",
    every: float = POLL_S,
) -> None:
    """Call ``check`` until it returns something true; AssertionError after ``within`` s."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(every)


async def wait_until_async(
    check: Callable[[], object | Awaitable[object]],
    *,
    within: float = 60.0,
    what: str = "condition",
    every: float = POLL_S,
) -> None:
    """:func:`wait_until` that lets the event loop run meanwhile; ``check`` may be async."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(every)
