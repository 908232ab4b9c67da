"""The HTTP side of a webhook attempt: one signed POST, bounded in time and size.

:class:`Sender` holds the worker process's one httpx transport (a
keep-alive connection pool shared by every endpoint). It is the SSRF guard
(:class:`bus.webhooks.transport.GuardedTransport`, httpx over aiohttp) unless one is passed, as
broadcaster's backends take an injected client: tests pass
``httpx.MockTransport`` to script the receiver's answers. Requests go to the
transport directly, not through an ``httpx.AsyncClient``: a webhook needs
none of what the client adds on top (redirects, which are never followed
since a redirect could lead past the guard's decision; auth; a cookie jar,
which would carry one receiver's cookies into later requests; proxies from
the environment, which are ignored), and those layers cost more CPU per
request than the transport itself. Only the first
``webhook_response_max_bytes`` of an answer are read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import httpx

from bus.errors import UnsafeURLError
from bus.settings import Settings
from bus.webhooks import ssrf
from bus.webhooks.endpoints import AttemptOutcome, Endpoint
from bus.webhooks.signing import sign_headers
from bus.webhooks.transport import GuardedTransport

log = logging.getLogger(__name__)

USER_AGENT = "lcbus-webhooks/0.1"
_HEADERS = {"user-agent": USER_AGENT, "content-type": "application/json"}


@dataclass(slots=True)
class Result:
    """What one HTTP attempt produced."""

    status: int | None = None
    response: str = ""
    """The start of the answer's body, for the attempt log."""
    error: str = ""
    refused: bool = False
    """The SSRF guard refused the address."""
    retry_after: str | None = None
    latency_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def outcome(self) -> AttemptOutcome:
        return "success" if self.ok else ("refused" if self.refused else "failure")

    def describe(self) -> str:
        """The failure, as a dead letter states it."""
        return self.error or f"HTTP {self.status}"


@functools.lru_cache(maxsize=4096)
def _parsed(url: str) -> httpx.URL:
    """``url`` parsed once per endpoint URL, not once per POST (httpx's parse is pure Python)."""
    return httpx.URL(url)


class Sender:
    """``Sender(settings=..., allow=networks, transport=None)``; ``await sender.post(...)``."""

    def __init__(
        self,
        *,
        settings: Settings,
        allow: tuple[ssrf.IPNetwork, ...],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        if transport is None:
            limits = httpx.Limits(
                max_connections=settings.webhook_max_jobs * 2,
                max_keepalive_connections=settings.webhook_max_jobs,
            )
            transport = GuardedTransport(allow=allow, limits=limits)
        self.transport = transport
        self._timeouts = httpx.Timeout(settings.webhook_timeout_s).as_dict()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def post(self, endpoint: Endpoint, msg_id: str, body: bytes) -> Result:
        """POST ``body`` signed with the endpoint's active secrets; never raises (but for
        cancellation): every failure is a result, logged in the attempt log."""
        result = Result()
        now = time.time()
        headers = sign_headers(
            message_id=msg_id,
            timestamp=int(now),
            body=body,
            secrets=endpoint.active_secrets(now),
        )
        timeout = self.settings.webhook_timeout_s
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await self._send(endpoint.url, headers, body, result)
        except UnsafeURLError as exc:
            result.refused, result.error = True, str(exc)
        except TimeoutError:
            result.error = f"timed out after {timeout:g} s"
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            # Anything else (httpx.InvalidURL, an IDNA error, a bug) is a failed attempt
            # too: logged, then retried on the schedule and dead-lettered, never lost in arq.
            log.warning("webhook %s attempt failed unexpectedly", msg_id, exc_info=True)
            result.error = f"{type(exc).__name__}: {exc}"
        result.latency_ms = (time.perf_counter() - started) * 1000
        return result

    async def _send(self, url: str, headers: dict[str, str], body: bytes, result: Result) -> None:
        limit = self.settings.webhook_response_max_bytes
        request = httpx.Request(
            "POST",
            _parsed(url),
            content=body,
            headers={**_HEADERS, **headers},
            extensions={"timeout": self._timeouts},
        )
        response = await self.transport.handle_async_request(request)
        try:
            result.status = response.status_code
            result.retry_after = response.headers.get("retry-after")
            chunks = bytearray()
            async for chunk in response.aiter_bytes():
                chunks += chunk
                if len(chunks) >= limit:
                    break
            result.response = chunks[:limit].decode(errors="replace")
        finally:
            await response.aclose()
