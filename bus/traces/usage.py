"""Token usage of model runs, as the provider reported it.

A count the provider did not report is None (unknown), never 0: ``ChatOpenAI``
with a custom ``base_url``, for one, streams without usage unless
``stream_usage=True``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from bus import events as ev


class TokenUsage(msgspec.Struct, kw_only=True, gc=False):
    """Token counts as the provider reported them; None where it did not report one."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    def add(self, other: TokenUsage) -> None:
        """Add ``other``'s known counts (an unknown count stays unknown only if both are)."""
        self.input_tokens = _plus(self.input_tokens, other.input_tokens)
        self.output_tokens = _plus(self.output_tokens, other.output_tokens)
        self.total_tokens = _plus(self.total_tokens, other.total_tokens)


def _plus(one: int | None, two: int | None) -> int | None:
    if one is None:
        return two
    return one if two is None else one + two


def usage_of(event: ev.LLMEnd) -> TokenUsage | None:
    """Token usage from ``usage_metadata`` or the provider's ``llm_output`` usage."""
    output = event.llm_output or {}
    for found in (event.usage, output.get("token_usage"), output.get("usage")):
        if isinstance(found, dict) and found:
            given = _count(found, "input_tokens", "prompt_tokens")
            taken = _count(found, "output_tokens", "completion_tokens")
            total = _count(found, "total_tokens")
            if total is None and given is not None and taken is not None:
                total = given + taken
            if given is None and taken is None and total is None:
                continue
            return TokenUsage(input_tokens=given, output_tokens=taken, total_tokens=total)
    return None


def _count(usage: dict[str, Any], *names: str) -> int | None:
    """A count reported under LangChain's or the provider's name; None if not reported."""
    for value in map(usage.get, names):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
