"""Reading a receiver's Retry-After header."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bus.webhooks.delivery import retry_after_s

NOW = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7.5 ", 7.5),
        ("-5", 0.0),
        ("99999", 3600.0),
        ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
        ("Wed, 31 Dec 2025 23:59:00 GMT", 0.0),
        ("Fri, 02 Jan 2026 00:00:00 GMT", 3600.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_delta_or_date_clamped_to_the_bound(header: str | None, seconds: float | None) -> None:
    assert retry_after_s(header, now=NOW, bound=3600.0) == seconds
