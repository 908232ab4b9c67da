"""Who may read a stream, and the HTTP answers the frontend, trace and admin APIs share.

A token comes from the query or the Authorization header.

EventSource and browser WebSockets cannot set headers, so ``?token=`` is
accepted beside ``Authorization: Bearer``. No token is 401; a forged,
expired or other-scope token is 403. ``admin_token`` (when set) reads
everything; ``open_access`` turns checks off for local development.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from bus.errors import AccessDenied, AccessError
from bus.settings import Settings
from bus.tokens import grants, verify_token


def error_response(status: int, reason: str) -> JSONResponse:
    """The JSON body every refused or malformed request gets: ``{"error": reason}``."""
    return JSONResponse({"error": reason}, status_code=status)


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def token_of(conn: HTTPConnection) -> str | None:
    return conn.query_params.get("token") or bearer_token(conn)


def check_access(
    conn: HTTPConnection,
    settings: Settings,
    *,
    trace_id: str | None = None,
    thread_id: str | None = None,
) -> None:
    """Return when ``conn`` may read the trace or thread; raise ``AccessDenied`` otherwise."""
    if settings.open_access:
        return
    token = token_of(conn)
    if token is None:
        raise AccessDenied(401, "a stream token is required (?token= or Authorization: Bearer)")
    if settings.admin_token and hmac.compare_digest(token, settings.admin_token):
        return
    try:
        scope = verify_token(token, secret=settings.stream_secret)
    except AccessError as exc:
        raise AccessDenied(403, str(exc)) from None
    if not grants(scope, trace_id=trace_id, thread_id=thread_id):
        raise AccessDenied(403, "token is for another trace or thread")
