from __future__ import annotations

import pytest

from bus.errors import WebhookError
from bus.events import EVENT_TYPES
from bus.webhooks.types import TOKEN_TYPES, WEBHOOK_TYPES, matches, validate_filter, webhook_type
from tests.support.webhooks import chain_end, custom, token


def test_every_bus_event_type_has_a_webhook_type() -> None:
    missing = set(EVENT_TYPES) - set(WEBHOOK_TYPES) - {"on_custom_event"}
    assert missing == set()
    assert len(set(WEBHOOK_TYPES.values())) == len(WEBHOOK_TYPES)


def test_event_to_type() -> None:
    assert webhook_type(chain_end()) == "chain.end"
    assert webhook_type(custom("report.ready")) == "custom.report.ready"
    assert webhook_type(token()) == "llm.new_token"


@pytest.mark.parametrize(
    ("filters", "wtype", "expected"),
    [
        (["chain.end"], "chain.end", True),
        (["chain.end"], "chain.start", False),
        (["llm.*"], "llm.end", True),
        (["llm.*"], "chat_model.start", False),
        (["llm.*"], "llm.new_token", False),
        (["*"], "llm.new_token", False),
        (["*"], "stream.event", False),
        (["llm.new_token"], "llm.new_token", True),
        (["*"], "trace.completed", True),
        (["custom.*"], "custom.report.ready", True),
        (["custom.report.*"], "custom.report.ready", True),
        (["custom.report.*"], "custom.reportx", False),
        (["tool.end", "trace.completed"], "tool.error", False),
    ],
)
def test_matches(filters: list[str], wtype: str, expected: bool) -> None:
    assert matches(filters, wtype) is expected


@pytest.mark.parametrize("bad", ["", "llm*", "*.end", "llm..end", "llm.*.x", "a b"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(WebhookError, match="bad event filter"):
        validate_filter(bad)


def test_token_types_are_in_the_table() -> None:
    assert set(WEBHOOK_TYPES.values()) >= TOKEN_TYPES
