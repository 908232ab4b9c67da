"""Turn arbitrary LangChain payloads into bounded, JSON-safe values.

Messages, documents and other pydantic models, dataclasses, bytes, UUIDs,
datetimes, cyclic or very deep structures and objects that do not serialize at
all become plain dicts, lists, strings and numbers. Each top-level field is
bounded by a byte budget; whatever does not fit is cut with a visible marker.
Secrets never leave the process: ``SecretStr`` values, the values of keys
that name credentials (``api_key``, ``github_token``, ``openai_key``,
``Authorization``, ``password``, ...) and the second item of header-like pairs
such as ``("Authorization", "Bearer ...")`` are replaced by :data:`REDACTED`.
Strings that cannot be encoded (a lone surrogate, from a provider that split
an emoji across chunks or from user input) are repaired by
:func:`encode_event` when, and only when, the normal encoding fails: valid
surrogate pairs are joined, lone ones become U+FFFD. Integers msgpack cannot
carry (beyond 64 bits) become their decimal text.

Free text that may quote credentials (a tool's argument string, exception
messages, agent logs) goes through :func:`redact_text`, which redacts
``name=value`` / ``name: value`` assignments of such names, ``Bearer``/``Basic``
credentials and well-known token shapes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec
from pydantic import BaseModel, SecretBytes, SecretStr

from bus import events as ev

REDACTED = "[redacted]"
CYCLE = "[cycle]"
MAX_DEPTH = 24
TRUNCATED = "…[truncated {} bytes]"
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
"""The integers msgpack carries."""

# Anywhere in the name: ``openai_api_key``, ``client_secret``, ``X-Auth-Password``...
_SECRET_WORD = re.compile(
    r"(api[_-]?key|apikey|secret|password|passwd|passphrase|authorization|bearer"
    r"|credential|private[_-]?key|cookie|session[_-]?id)",
    re.IGNORECASE,
)
# At the end of the name: ``github_token``, ``openai_key``, ``x-api-key``, ``hfToken``;
# not plurals (``max_tokens``, ``total_tokens`` are counts).
_SECRET_SUFFIX = re.compile(r"[_\-. ](key|token)$|^(auth|token)$", re.IGNORECASE)
_SECRET_CAMEL = re.compile(r"[a-z0-9](Key|Token)$")


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a credential (``openai_api_key``, ``Authorization``,
    ``github_token``, ``openai_key``…)."""
    return (
        _SECRET_WORD.search(key) is not None
        or _SECRET_SUFFIX.search(key) is not None
        or _SECRET_CAMEL.search(key) is not None
    )


# ``name=value``, ``name: value``, ``"name": "value"``, ``'name': 'value'`` in free text.
# Names like the keys above (the words, the suffixes, the camelCase forms), so that a
# credential's name is found wherever it stands, not only where a scan for any
# ``name: value`` happens to start.
_SECRET_NAME = (
    r"[\w\-.]*(?i:api[_-]?key|apikey|secret|password|passwd|passphrase|authorization|bearer"
    r"|credential|private[_-]?key|cookie|session[_-]?id)[\w\-.]*"
    r"|[\w\-.]*[_\-.](?i:key|token)|(?i:token|auth)|\w*[a-z0-9](?:Key|Token)"
)
_ASSIGNMENT = re.compile(
    rf"""(?P<q>["']?)\b(?P<name>{_SECRET_NAME})(?P=q)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<value>"[^"]*"|'[^']*'|(?:(?:Bearer|Basic|Token)\s+)?[^\s,;&)}\]'"]+)"""
)
_SCHEME_CREDENTIAL = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE)
_TOKEN_SHAPES = re.compile(
    r"\b(sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abpr]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_\-]{30,})"
)


def redact_text(text: str) -> str:
    """``text`` with the credentials it quotes replaced by :data:`REDACTED`."""
    if not text:
        return text
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _TOKEN_SHAPES.sub(REDACTED, text)


def _redact_assignment(match: re.Match[str]) -> str:
    if not is_secret_key(match.group("name")):
        return match.group(0)
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    head = match.group(0)[: match.start("value") - match.start(0)]
    return f"{head}{quote}{REDACTED}{quote}"


class _Budget:
    """Bytes left for one field; shared by the whole walk of that field."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit


def safe(value: Any, *, max_bytes: int) -> Any:
    """A JSON-safe copy of ``value`` of roughly at most ``max_bytes`` when encoded."""
    return _walk(value, _Budget(max_bytes), 0, set())


def safe_str(value: str, *, max_bytes: int) -> str:
    """``value`` cut to ``max_bytes`` (UTF-8) with a marker when longer."""
    if type(value) is not str:  # str subclasses (LangChain's TextAccessor) do not encode
        value = str.__str__(value)
    if len(value) * 4 <= max_bytes:  # fast path: cannot exceed the bound
        return value
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return value
    head = encoded[:max_bytes].decode("utf-8", "ignore")
    return head + TRUNCATED.format(len(encoded) - max_bytes)


def encode_event(event: ev.BaseEvent) -> bytes:
    """``event`` as msgpack, its strings repaired first if they cannot be encoded.

    The normal encoding is tried first: the repair walks the whole event and
    only runs for an event that needs it.
    """
    try:
        return ev.encode(event)
    except UnicodeEncodeError:
        return ev.encode(msgspec.convert(_repaired(msgspec.to_builtins(event)), type(event)))


def encodable(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (valid pairs joined)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _repaired(value: Any) -> Any:
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable(k) if isinstance(k, str) else k: _repaired(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_repaired(item) for item in value]
    return value


def _walk(value: Any, budget: _Budget, depth: int, path: set[int]) -> Any:
    if value is None or isinstance(value, bool | float):
        budget.left -= 8
        return value
    if isinstance(value, int):
        budget.left -= 8
        return value if _INT_MIN <= value <= _INT_MAX else str(value)
    if isinstance(value, str):
        return _take_str(value, budget)
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if depth >= MAX_DEPTH:
        return "[max depth]"
    if isinstance(value, bytes | bytearray | memoryview):
        return _take_str(bytes(value).decode("utf-8", "backslashreplace"), budget)
    if isinstance(value, uuid.UUID | dt.datetime | dt.date | dt.time | enum.Enum):
        return _take_str(_scalar_text(value), budget)
    marker = id(value)
    if marker in path:
        return CYCLE
    path.add(marker)
    try:
        return _walk_container(value, budget, depth, path)
    finally:
        path.discard(marker)


def _walk_container(value: Any, budget: _Budget, depth: int, path: set[int]) -> Any:
    if isinstance(value, Mapping):
        return _walk_mapping(value, budget, depth, path)
    if isinstance(value, list | tuple | set | frozenset):
        return _walk_items(value, budget, depth, path)
    if isinstance(value, BaseModel):
        fields = {name: getattr(value, name, None) for name in type(value).model_fields}
        return _walk_mapping(fields, budget, depth, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        return _walk_mapping(fields, budget, depth, path)
    return _take_str(_describe(value), budget)


def _walk_mapping(value: Mapping[Any, Any], budget: _Budget, depth: int, path: set[int]) -> Any:
    result: dict[str, Any] = {}
    for key, item in value.items():
        if budget.left <= 0:
            result["…"] = f"[truncated {len(value) - len(result)} more keys]"
            break
        name = key if isinstance(key, str) else str(key)
        budget.left -= len(name) + 2
        if is_secret_key(name) and item is not None:
            result[name] = REDACTED
        else:
            result[name] = _walk(item, budget, depth + 1, path)
    return result


def _walk_items(value: Any, budget: _Budget, depth: int, path: set[int]) -> list[Any]:
    items = list(value)
    result: list[Any] = []
    for item in items:
        if budget.left <= 0:
            result.append(f"[truncated {len(items) - len(result)} more items]")
            break
        if _is_secret_pair(item):
            result.append([_walk(item[0], budget, depth + 1, path), REDACTED])
        else:
            result.append(_walk(item, budget, depth + 1, path))
    return result


def _is_secret_pair(item: Any) -> bool:
    """A header-like ``(name, value)`` pair whose name is a credential's."""
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str | bytes)
        and item[1] is not None
        and is_secret_key(
            item[0].decode(errors="replace") if isinstance(item[0], bytes) else item[0]
        )
    )


def _take_str(value: str, budget: _Budget) -> str:
    limit = max(budget.left // 2, 64)  # leave room for the siblings that follow
    text = safe_str(value, max_bytes=limit)
    budget.left -= len(text) + 2
    return text


def _scalar_text(value: uuid.UUID | dt.datetime | dt.date | dt.time | enum.Enum) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value.isoformat()


def _describe(value: Any) -> str:
    """A safe text for an object that is not data: its repr, or its type if repr fails."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break publishing
        return f"<unrepresentable {type(value).__qualname__}>"
    return text if isinstance(text, str) else f"<{type(value).__qualname__}>"
