"""The webhook worker's HTTP connections: an aiohttp session behind the SSRF guard.

Its own module because aiohttp is a worker dependency: the base install
imports :mod:`bus.webhooks.ssrf` (registration checks URLs) but never sends.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from typing import Any

import aiohttp
import aiohttp.abc
import certifi
from aiohttp.abc import ResolveResult

from bus.webhooks.ssrf import IPNetwork, check_address, checked_addresses, sockaddr_ip

KEEPALIVE_S = 5.0
"""How long an idle pooled connection is kept: httpx's default, which the sender had
before; receivers such as Node's http server close idle connections after 5 s, and a
POST on a connection the receiver is closing fails."""


class _GuardedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookup for webhook hosts: every answer checked, or none returned."""

    def __init__(self, allow: tuple[IPNetwork, ...]) -> None:
        self._allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await checked_addresses(host, port, self._allow)
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in addresses
        ]

    async def close(self) -> None:
        return None


def _guarded_socket(allow: tuple[IPNetwork, ...]) -> Any:
    """aiohttp's socket factory: the address is checked as the socket is made for it.

    The resolver has checked every address of a name already; this check also
    covers an IP literal in the URL, which aiohttp never resolves.
    """

    def make(addr_info: Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        check_address(sockaddr_ip(sockaddr), allow)
        return socket.socket(family=family, type=type_, proto=proto)

    return make


def guarded_session(
    *,
    allow: Iterable[IPNetwork] = (),
    max_connections: int,
    ssl_context: ssl.SSLContext | None = None,
) -> aiohttp.ClientSession:
    """An aiohttp session whose every connection passes the SSRF guard.

    Call it on the loop it will run on (aiohttp binds a session to it).
    ``ssl_context`` defaults to certifi's roots (tests pass one trusting their
    own CA). No proxy, no environment settings (a proxy would connect on our
    behalf to an address we never checked), no cookie jar (it would carry one
    receiver's cookies into later requests), no DNS cache (each new connection
    resolves and checks again); the caller never follows redirects and bounds
    each request's time itself.
    """
    allowed = tuple(allow)
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_S,
        ssl=ssl_context or ssl.create_default_context(cafile=certifi.where()),
        resolver=_GuardedResolver(allowed),
        use_dns_cache=False,
        socket_factory=_guarded_socket(allowed),
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )
