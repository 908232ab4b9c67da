"""The SSRF guard: webhook URLs may only reach public addresses.

A webhook URL is chosen by whoever registers the endpoint, and the worker
that POSTs to it runs inside the deployment's network. Without a guard a URL
such as ``http://169.254.169.254/`` (cloud metadata) or ``http://10.0.0.1/``
turns the worker into a proxy into that network.

Refused by default: every address that is not globally routable (loopback,
private, link-local, shared/CGNAT, reserved, unspecified, documentation
ranges, the deprecated site-local ``fec0::/10``, local-use NAT64
``64:ff9b:1::/48``) and every multicast address, for IPv4 and IPv6. IPv6
forms that carry an IPv4 address are judged by the IPv4 address inside too:
IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``,
IPv4-translated ``::ffff:0:a.b.c.d``, 6to4 ``2002::/16``, NAT64
``64:ff9b::/96`` and Teredo (Python calls several of these global).
``LCBUS_WEBHOOK_ALLOW_NETWORKS`` (comma-separated CIDRs) opens chosen
networks, e.g. ``127.0.0.0/8,::1/128`` for tests and the demo.

The check runs twice: at registration (the host is resolved and every
address checked), and at delivery on the address actually connected to.
``bus.webhooks.transport.guarded_session`` resolves the host itself, checks every candidate
address and connects to a checked IP (and checks the address again as the
socket is made for it), while the Host header and the TLS SNI and
certificate check still use the hostname; so a DNS answer that changes
between registration and delivery (DNS rebinding) cannot reach a refused
address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from bus.errors import ConfigError, UnsafeURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 ranges whose last 32 bits are an IPv4 address (RFC 4291 2.5.5.1, RFC 2765, RFC 6052).
_IPV4_IN_LOW_BITS = (
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), with :: and ::1
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix
)
# Local-use NAT64 (RFC 8215): translates into whatever the operator chose; never public.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """``"127.0.0.0/8, ::1/128"`` -> networks; ConfigError on a bad entry."""
    networks: list[IPNetwork] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ConfigError(f"LCBUS_WEBHOOK_ALLOW_NETWORKS: {part!r} is not a CIDR") from exc
    return tuple(networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _IPV4_IN_LOW_BITS) and int(ip) > 1:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused, or None if it is a public unicast address."""
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip in _LOCAL_NAT64:
        return "local-use NAT64"
    if not ip.is_global:
        return "private or reserved (not globally routable)"
    return None


def check_address(ip: IPAddress, allow: Iterable[IPNetwork] = ()) -> None:
    """Raise :class:`UnsafeURLError` unless ``ip`` may be connected to."""
    allowed = tuple(allow)
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            candidates.insert(0, inner)  # the IPv4 address inside is what gets reached
    for candidate in candidates:
        if any(candidate.version == net.version and candidate in net for net in allowed):
            return
    for candidate in candidates:
        reason = _refusal(candidate)
        if reason is not None:
            shown = ip if candidate == ip else f"{ip} (carrying {candidate})"
            raise UnsafeURLError(
                f"address {shown} is {reason}; webhooks may only reach public addresses "
                "(LCBUS_WEBHOOK_ALLOW_NETWORKS opens chosen networks)"
            )


def sockaddr_ip(sockaddr: tuple[Any, ...]) -> IPAddress:
    """The IP of a socket address, without an IPv6 scope (``fe80::1%eth0``)."""
    return ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (a literal IP resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeURLError(f"cannot resolve webhook host {host!r}: {exc}") from exc
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = sockaddr_ip(sockaddr)
        if ip not in found:
            found.append(ip)
    if not found:
        raise UnsafeURLError(f"webhook host {host!r} resolves to no address")
    return found


async def checked_addresses(host: str, port: int, allow: Iterable[IPNetwork]) -> list[IPAddress]:
    """Resolve ``host`` and check every address; one refused address refuses all.

    Refusing the whole answer (instead of skipping the bad address) keeps a
    rebinding attacker from mixing a public and a private address.
    """
    allowed = tuple(allow)
    addresses = await resolve(host, port)
    for ip in addresses:
        try:
            check_address(ip, allowed)
        except UnsafeURLError as exc:
            raise UnsafeURLError(f"webhook host {host!r}: {exc}") from None
    return addresses


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; UnsafeURLError for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURLError(f"bad webhook URL {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeURLError(f"webhook URL must be http or https, got {url!r}")
    if not parts.hostname:
        raise UnsafeURLError(f"webhook URL has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURLError("webhook URL must not carry credentials; use the signature instead")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def check_url(url: str, allow: Iterable[IPNetwork] = ()) -> list[IPAddress]:
    """Registration check: the URL's scheme, and every address its host has now."""
    host, port = split_url(url)
    return await checked_addresses(host, port, allow)
