"""The HTTP side of a webhook attempt: one signed POST, bounded in time and size.

:class:`Sender` holds the worker process's one ``httpx.AsyncClient``. Its
transport is the SSRF guard (:class:`bus.webhooks.ssrf.GuardedTransport`)
unless one is passed, as broadcaster's backends take an injected client: tests
pass ``httpx.MockTransport`` to script the receiver's answers. Redirects are
never followed (a redirect could lead past the guard's decision), proxies from
the environment are ignored, and only the first ``webhook_response_max_bytes``
of an answer are read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from bus.errors import UnsafeURLError
from bus.settings import Settings
from bus.webhooks import ssrf
from bus.webhooks.endpoints import AttemptOutcome, Endpoint
from bus.webhooks.signing import sign_headers

USER_AGENT = "lcbus-webhooks/0.1"


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
            transport = ssrf.GuardedTransport(allow=allow, limits=limits)
        self.client = httpx.AsyncClient(
            transport=transport,
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def post(self, endpoint: Endpoint, msg_id: str, body: bytes) -> Result:
        """POST ``body`` signed with the endpoint's active secrets; never raises for HTTP."""
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
        result.latency_ms = (time.perf_counter() - started) * 1000
        return result

    async def _send(self, url: str, headers: dict[str, str], body: bytes, result: Result) -> None:
        limit = self.settings.webhook_response_max_bytes
        async with self.client.stream("POST", url, content=body, headers=headers) as response:
            result.status = response.status_code
            result.retry_after = response.headers.get("retry-after")
            chunks = bytearray()
            async for chunk in response.aiter_bytes():
                chunks += chunk
                if len(chunks) >= limit:
                    break
            result.response = chunks[:limit].decode(errors="replace")
