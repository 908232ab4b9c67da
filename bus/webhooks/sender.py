"""The HTTP side of a webhook attempt: one signed POST, bounded in time and size.

:class:`Sender` holds the worker process's one aiohttp session (a keep-alive
connection pool shared by every endpoint), made on its loop at the first
POST, behind the SSRF guard (:func:`bus.webhooks.transport.guarded_session`).
aiohttp directly, not httpx over it: httpx's request and response models cost
more CPU per POST than aiohttp's own client (184-186 against 101-107 us at 20
concurrent POSTs on uvloop, measured on 2026-12-03). Redirects are never
followed (a redirect could lead past the guard's decision); only the first
``webhook_response_max_bytes`` of an answer are read.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from dataclasses import dataclass

import aiohttp
import yarl

from bus.errors import UnsafeURLError
from bus.settings import Settings
from bus.webhooks import ssrf
from bus.webhooks.endpoints import AttemptOutcome, Endpoint, sendable_url
from bus.webhooks.signing import sign_headers
from bus.webhooks.transport import guarded_session

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
def _parsed(url: str) -> yarl.URL:
    """``url`` parsed once per endpoint URL, not once per POST.

    The form registration checked (:func:`~bus.webhooks.endpoints.sendable_url`:
    percent-encoded, the host in IDNA), taken as encoded, so that the host
    connected to is the one the guard judged and nothing is encoded twice.
    """
    return yarl.URL(sendable_url(url), encoded=True)


class Sender:
    """``Sender(settings=..., allow=networks)``; ``await sender.post(...)``."""

    def __init__(
        self,
        *,
        settings: Settings,
        allow: tuple[ssrf.IPNetwork, ...],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._allow = allow
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = guarded_session(
                allow=self._allow,
                max_connections=self.settings.webhook_max_jobs * 2,
                ssl_context=self._ssl_context,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        except Exception as exc:
            # aiohttp's errors, and anything else (an unparsable URL, a bug): a failed
            # attempt, logged, retried on the schedule and dead-lettered, never lost in arq.
            if not isinstance(exc, aiohttp.ClientError):
                log.warning("webhook %s attempt failed unexpectedly", msg_id, exc_info=True)
            result.error = f"{type(exc).__name__}: {exc}"
        result.latency_ms = (time.perf_counter() - started) * 1000
        return result

    async def _send(self, url: str, headers: dict[str, str], body: bytes, result: Result) -> None:
        limit = self.settings.webhook_response_max_bytes
        request = self._client().post(
            _parsed(url), data=body, headers={**_HEADERS, **headers}, allow_redirects=False
        )
        async with request as response:
            result.status = response.status
            result.retry_after = response.headers.get("retry-after")
            chunks = bytearray()
            while len(chunks) < limit and (chunk := await response.content.read(limit)):
                chunks += chunk
            # Leaving the block releases the connection; an answer not read to its
            # end closes it rather than reading on.
            result.response = chunks[:limit].decode(errors="replace")
