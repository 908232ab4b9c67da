"""Webhook event type names, and which endpoint filters they match.

A webhook's ``type`` is a dot-separated name derived from the bus event:

=============================  ===============================
webhook type                   bus event (``type`` tag)
=============================  ===============================
``llm.start``                  ``on_llm_start``
``chat_model.start``           ``on_chat_model_start``
``llm.new_token`` (token)      ``on_llm_new_token``
``llm.end``                    ``on_llm_end``
``llm.error``                  ``on_llm_error``
``chain.start``                ``on_chain_start``
``chain.end``                  ``on_chain_end``
``chain.error``                ``on_chain_error``
``tool.start``                 ``on_tool_start``
``tool.end``                   ``on_tool_end``
``tool.error``                 ``on_tool_error``
``retriever.start``            ``on_retriever_start``
``retriever.end``              ``on_retriever_end``
``retriever.error``            ``on_retriever_error``
``agent.action``               ``on_agent_action``
``agent.finish``               ``on_agent_finish``
``text``                       ``on_text``
``retry``                      ``on_retry``
``stream.event`` (token)       ``on_stream_event``
``custom.<name>``              ``on_custom_event`` (``<name>`` is its ``event_name``)
``trace.completed``            ``trace_completed`` (from the trace worker)
``webhook.endpoint_disabled``  ``webhook_endpoint_disabled`` (from the webhook worker)
=============================  ===============================

An endpoint's event filters are exact names (``chain.end``), a family
(``llm.*`` matches every name starting with ``llm.``), or ``*`` for all.
Token events (marked above) are far more numerous than the rest, so they go
only to endpoints that name them exactly: ``*`` and ``llm.*`` do not match
``llm.new_token``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bus.errors import WebhookError
from bus.events import BaseEvent, CustomEvent, event_type

WEBHOOK_TYPES: dict[str, str] = {
    "on_llm_start": "llm.start",
    "on_chat_model_start": "chat_model.start",
    "on_llm_new_token": "llm.new_token",
    "on_llm_end": "llm.end",
    "on_llm_error": "llm.error",
    "on_chain_start": "chain.start",
    "on_chain_end": "chain.end",
    "on_chain_error": "chain.error",
    "on_tool_start": "tool.start",
    "on_tool_end": "tool.end",
    "on_tool_error": "tool.error",
    "on_retriever_start": "retriever.start",
    "on_retriever_end": "retriever.end",
    "on_retriever_error": "retriever.error",
    "on_agent_action": "agent.action",
    "on_agent_finish": "agent.finish",
    "on_text": "text",
    "on_retry": "retry",
    "on_stream_event": "stream.event",
    "trace_completed": "trace.completed",
    "webhook_endpoint_disabled": "webhook.endpoint_disabled",
}
"""Bus event tag -> webhook type (``on_custom_event`` is ``custom.<name>``)."""

TOKEN_TYPES = frozenset({"llm.new_token", "stream.event"})
"""Types delivered only to endpoints that name them exactly."""

CUSTOM_PREFIX = "custom."

_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def webhook_type(event: BaseEvent) -> str | None:
    """The webhook type of a bus event; None for events that are never sent."""
    if isinstance(event, CustomEvent):
        return CUSTOM_PREFIX + (event.event_name or "unnamed")
    return WEBHOOK_TYPES.get(event_type(event))


def validate_filter(pattern: str) -> str:
    """``pattern`` if it is an exact name, ``family.*`` or ``*``; else WebhookError."""
    if pattern == "*":
        return pattern
    name = pattern[:-2] if pattern.endswith(".*") else pattern
    if not _NAME.match(name):
        raise WebhookError(
            f"bad event filter {pattern!r}: use an exact type such as 'chain.end', "
            "a family such as 'llm.*', or '*'"
        )
    return pattern


def matches(filters: Iterable[str], wtype: str) -> bool:
    """Whether an endpoint with these event filters receives ``wtype``."""
    token = wtype in TOKEN_TYPES
    for pattern in filters:
        if pattern == wtype:
            return True
        if token:
            continue
        if pattern == "*" or (pattern.endswith(".*") and wtype.startswith(pattern[:-1])):
            return True
    return False
