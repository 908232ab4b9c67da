"""The unit tier runs without Redis: the fixtures that reach it fail here instead of skipping."""

from __future__ import annotations

import pytest


@pytest.fixture
def prefix() -> str:
    """Every Redis fixture of ``tests/conftest.py`` starts from this one."""
    pytest.fail("tests/unit runs without Redis: move this test to tests/redis", pytrace=False)
