"""Who may read a stream: a token from the query or the Authorization header.

EventSource and browser WebSockets cannot set headers, so ``?token=`` is
accepted beside ``Authorization: Bearer``. No token is 401; a forged,
expired or other-scope token is 403. ``admin_token`` (when set) reads
everything; ``open_access`` turns checks off for local development.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from bus.errors import AccessError
from bus.settings import Settings
from bus.tokens import grants, verify_token


class Denied(Exception):
    """A refused request; ``status`` is the HTTP status (401 or 403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def token_of(conn: HTTPConnection) -> str | None:
    token = conn.query_params.get("token")
    if token:
        return token
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def check_access(
    conn: HTTPConnection,
    settings: Settings,
    *,
    trace_id: str | None = None,
    thread_id: str | None = None,
) -> None:
    """Return when ``conn`` may read the trace or thread; raise :class:`Denied` otherwise."""
    if settings.open_access:
        return
    token = token_of(conn)
    if token is None:
        raise Denied(401, "a stream token is required (?token= or Authorization: Bearer)")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters.
    if settings.admin_token and hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        return
    try:
        scope = verify_token(token, secret=settings.stream_secret)
    except AccessError as exc:
        raise Denied(403, str(exc)) from None
    if not grants(scope, trace_id=trace_id, thread_id=thread_id):
        raise Denied(403, "token is for another trace or thread")
