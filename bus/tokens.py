"""Signed, expiring access tokens for the read APIs (streams and traces).

The app issues a token for one trace or one thread with :func:`stream_token`
and hands it to the browser; frontends check it with :func:`verify_token`.
A token is ``<payload>.<signature>``: the payload is base64url JSON
``{"s": scope, "e": expiry}`` and the signature is HMAC-SHA256 over it with
the server secret. Scopes are ``trace:<id>``, ``thread:<id>`` or ``*`` (every
trace and thread; for operators and the trace list).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import msgspec

from bus.errors import AccessError

DEFAULT_TTL_S = 3600


class _Claims(msgspec.Struct):
    s: str
    e: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def issue_token(scope: str, *, secret: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    """A token granting ``scope`` until ``ttl_s`` seconds from now."""
    if not secret:
        raise AccessError("cannot issue tokens without a server secret (LCBUS_STREAM_SECRET)")
    payload = _b64(msgspec.json.encode(_Claims(s=scope, e=int(time.time()) + ttl_s)))
    return f"{payload}.{_sign(secret, payload)}"


def stream_token(trace_id: str, *, secret: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    """A token for reading one trace's stream and tree."""
    return issue_token(f"trace:{trace_id}", secret=secret, ttl_s=ttl_s)


def thread_token(thread_id: str, *, secret: str, ttl_s: int = DEFAULT_TTL_S) -> str:
    """A token for reading every trace of one thread."""
    return issue_token(f"thread:{thread_id}", secret=secret, ttl_s=ttl_s)


def verify_token(token: str, *, secret: str) -> str:
    """The scope a valid token grants; :class:`AccessError` otherwise."""
    if not token.isascii():
        # A token is base64url and a dot; anything else is refused before any comparison.
        raise AccessError("malformed token: a token is ASCII only")
    payload, _, signature = token.partition(".")
    if not payload or not signature or not secret:
        raise AccessError("malformed token")
    if not hmac.compare_digest(signature.encode(), _sign(secret, payload).encode()):
        raise AccessError("bad token signature")
    try:
        claims = msgspec.json.decode(_unb64(payload), type=_Claims)
    except (ValueError, msgspec.DecodeError) as exc:
        raise AccessError("malformed token payload") from exc
    if claims.e < time.time():
        raise AccessError("token expired")
    return claims.s


def grants(scope: str, *, trace_id: str | None = None, thread_id: str | None = None) -> bool:
    """Whether a verified ``scope`` covers the trace or thread asked for."""
    if scope == "*":
        return True
    if trace_id is not None and scope == f"trace:{trace_id}":
        return True
    return thread_id is not None and scope == f"thread:{thread_id}"
