"""The fields of each event, built from the arguments of LangChain's callbacks.

Everything here is bounded and JSON-safe (see :mod:`bus.producer.sanitize`);
the run's own fields (ids, name, tags, ...) are added by the handler.
"""

from __future__ import annotations

from typing import Any

from langchain_core.outputs import ChatGeneration, LLMResult

from bus.producer.sanitize import redact_text, safe, safe_str


def run_name(serialized: dict[str, Any] | None, callback_kwargs: dict[str, Any]) -> str:
    """The run's name the way LangChain's tracer derives it."""
    name = callback_kwargs.get("name")
    if name:
        return str(name)
    if serialized:
        if serialized.get("name"):
            return str(serialized["name"])
        ids = serialized.get("id")
        if ids:
            return str(ids[-1])
    return "Unnamed"


def blocks_text(blocks: list[str | dict[str, Any]]) -> str:
    """The text of a token given as content blocks."""
    parts = [b if isinstance(b, str) else str(b.get("text", "")) for b in blocks]
    return "".join(parts)


def error_text(exc: BaseException | None) -> str:
    """``"ExcType: message"``, with the credentials the message quotes redacted."""
    return redact_text(f"{type(exc).__name__}: {exc}") if exc is not None else ""


def error(exc: BaseException, max_bytes: int) -> dict[str, Any]:
    """The fields of an ``on_*_error`` event."""
    return {
        "error": safe_str(error_text(exc), max_bytes=max_bytes),
        "error_type": type(exc).__name__,
    }


def tool_start(
    input_str: str,
    inputs: dict[str, Any] | None,
    callback_kwargs: dict[str, Any],
    max_bytes: int,
) -> dict[str, Any]:
    structured = safe(inputs, max_bytes=max_bytes)
    # The argument string repeats the arguments: derived from the sanitized ones
    # when LangChain passes them, else with the credentials it quotes redacted.
    text = str(structured) if isinstance(inputs, dict) else redact_text(str(input_str))
    fields = {"input_str": safe_str(text, max_bytes=max_bytes), "inputs": structured}
    if callback_kwargs.get("tool_call_id"):
        fields["tool_call_id"] = str(callback_kwargs["tool_call_id"])
    return fields


def llm_end(response: LLMResult, max_bytes: int) -> dict[str, Any]:
    """The final text, the generations, and the token usage wherever the model put it."""
    first = response.generations[0][0] if response.generations and response.generations[0] else None
    usage = None
    if isinstance(first, ChatGeneration):
        usage = getattr(first.message, "usage_metadata", None)
    if usage is None and response.llm_output:
        usage = response.llm_output.get("token_usage") or response.llm_output.get("usage")
    return {
        "text": safe_str(str(first.text), max_bytes=max_bytes) if first is not None else "",
        "generations": safe(response.generations, max_bytes=max_bytes),
        "llm_output": safe(response.llm_output, max_bytes=max_bytes)
        if response.llm_output
        else None,
        "usage": safe(usage, max_bytes=max_bytes) if usage else None,
    }


def agent_action(action: Any, max_bytes: int) -> dict[str, Any]:
    return {
        "tool": str(getattr(action, "tool", "")),
        "tool_input": safe(getattr(action, "tool_input", None), max_bytes=max_bytes),
        "log": safe_str(redact_text(str(getattr(action, "log", ""))), max_bytes=max_bytes),
    }


def agent_finish(finish: Any, max_bytes: int) -> dict[str, Any]:
    return {
        "return_values": safe(getattr(finish, "return_values", {}) or {}, max_bytes=max_bytes),
        "log": safe_str(redact_text(str(getattr(finish, "log", ""))), max_bytes=max_bytes),
    }


def retry(retry_state: Any, max_bytes: int) -> dict[str, Any]:
    """The attempt number and, when the last attempt failed, its error."""
    outcome = getattr(retry_state, "outcome", None)
    failure = outcome.exception() if outcome is not None and outcome.failed else None
    return {
        "attempt": int(getattr(retry_state, "attempt_number", 0) or 0),
        "error": safe_str(error_text(failure), max_bytes=max_bytes) if failure else "",
    }
