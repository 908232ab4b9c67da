from __future__ import annotations

import asyncio
import ipaddress
import ssl

import aiohttp
import pytest
import trustme

from bus.errors import ConfigError, UnsafeURLError
from bus.webhooks import ssrf
from bus.webhooks.transport import guarded_session

LOOPBACK = ssrf.parse_networks("127.0.0.0/8,::1/128")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",  # shared / CGNAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "ff0e::1",  # global-scope multicast is still multicast
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(UnsafeURLError):
        ssrf.check_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    ssrf.check_address(ipaddress.ip_address(address))


def test_allow_list_opens_chosen_networks_only() -> None:
    ssrf.check_address(ipaddress.ip_address("127.0.0.1"), LOOPBACK)
    ssrf.check_address(ipaddress.ip_address("::1"), LOOPBACK)
    ssrf.check_address(ipaddress.ip_address("::ffff:127.0.0.1"), LOOPBACK)
    with pytest.raises(UnsafeURLError):
        ssrf.check_address(ipaddress.ip_address("10.0.0.1"), LOOPBACK)


def test_bad_allow_list_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a CIDR"):
        ssrf.parse_networks("127.0.0.0/8,nonsense")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://localhost:8080/hook",
    ],
)
async def test_registration_check_refuses(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="public addresses"):
        await ssrf.check_url(url)


async def test_localhost_passes_when_loopback_is_allowed() -> None:
    addresses = await ssrf.check_url("http://localhost:8080/hook", LOOPBACK)
    assert all(ip.is_loopback for ip in addresses)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http or https"),
        ("http:///path", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "bad webhook URL"),
    ],
)
async def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(UnsafeURLError, match=message):
        await ssrf.check_url(url, LOOPBACK)


async def test_transport_checks_the_address_it_connects_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: the name was public at registration, loopback at delivery."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async def rebinding(host: str, port: int) -> list[ssrf.IPAddress]:
        return [ipaddress.ip_address(a) for a in next(answers)]

    monkeypatch.setattr(ssrf, "resolve", rebinding)
    await ssrf.check_url("http://rebind.example/hook")
    async with guarded_session(max_connections=1) as session:
        with pytest.raises(UnsafeURLError, match=r"rebind\.example.*127\.0\.0\.1.*loopback"):
            await session.post("http://rebind.example/hook", data=b"{}")


# IPv6 forms that carry an IPv4 address, each with the refused address inside.
EMBEDDED_IPV4 = [
    ("::ffff:169.254.169.254", "169.254.169.254"),  # IPv4-mapped
    ("::169.254.169.254", "169.254.169.254"),  # IPv4-compatible
    ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
    ("::ffff:0:10.0.0.1", "10.0.0.1"),  # IPv4-translated
    ("2002:a9fe:a9fe::1", "169.254.169.254"),  # 6to4
    ("64:ff9b::10.0.0.1", "10.0.0.1"),  # NAT64
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "10.0.0.1"),  # Teredo, client 10.0.0.1
]


@pytest.mark.parametrize(("address", "inner"), EMBEDDED_IPV4)
def test_ipv6_forms_are_judged_by_the_ipv4_inside(address: str, inner: str) -> None:
    with pytest.raises(UnsafeURLError, match=rf"carrying {inner}\)"):
        ssrf.check_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["::8.8.8.8", "::ffff:0:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"]
)
def test_ipv6_forms_carrying_a_public_ipv4_pass(address: str) -> None:
    ssrf.check_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "reason"),
    [("fec0::1", "site-local"), ("feff:ffff::1", "site-local"), ("64:ff9b:1::a00:1", "NAT64")],
)
def test_site_local_and_local_nat64_are_refused(address: str, reason: str) -> None:
    with pytest.raises(UnsafeURLError, match=reason):
        ssrf.check_address(ipaddress.ip_address(address))


REFUSED_IPV6 = [a for a, _ in EMBEDDED_IPV4] + ["fec0::1", "64:ff9b:1::a00:1"]


@pytest.mark.parametrize("address", REFUSED_IPV6)
async def test_registration_refuses_every_ipv6_form(address: str) -> None:
    with pytest.raises(UnsafeURLError, match="public addresses"):
        await ssrf.check_url(f"http://[{address}]:8080/hook")


@pytest.mark.parametrize("address", REFUSED_IPV6)
async def test_delivery_refuses_every_ipv6_form(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to the form at delivery is refused before connecting."""

    async def answer(host: str, port: int) -> list[ssrf.IPAddress]:
        return [ipaddress.ip_address(address)]

    monkeypatch.setattr(ssrf, "resolve", answer)
    async with guarded_session(max_connections=1) as session:
        with pytest.raises(UnsafeURLError, match=r"hook\.example.*public addresses"):
            await session.post("http://hook.example/hook", data=b"{}")


class _OneAnswerServer:
    """A loopback HTTP(S) server answering 200 and recording each request's Host and SNI."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.sni: list[str | None] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(
            line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line
        )
        self.hosts.append(headers.get("Host", headers.get("host", "")))
        await reader.readexactly(
            int(headers.get("Content-Length", headers.get("content-length", 0)))
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()


async def test_an_ip_literal_is_checked_as_the_socket_is_made() -> None:
    """aiohttp never resolves an IP literal: the socket factory checks it instead."""
    server = _OneAnswerServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with guarded_session(max_connections=1) as refusing:
            with pytest.raises(UnsafeURLError, match=r"127\.0\.0\.1 is loopback"):
                await refusing.post(f"http://127.0.0.1:{port}/hook", data=b"{}")
        loopback = ssrf.parse_networks("127.0.0.0/8")
        allowing = guarded_session(allow=loopback, max_connections=1)
        async with allowing, allowing.post(f"http://127.0.0.1:{port}/hook", data=b"{}") as answer:
            assert await answer.text() == "ok"
        assert server.hosts == [f"127.0.0.1:{port}"]
    finally:
        listener.close()


async def test_https_connects_to_the_checked_ip_and_verifies_the_hostname(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The name resolves to a checked IP; SNI, certificate and Host stay the name's."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hook.example").configure_cert(server_ctx)
    server = _OneAnswerServer()
    server_ctx.sni_callback = lambda _sock, name, _ctx: server.sni.append(name)  # type: ignore[assignment,func-returns-value]
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]

    async def answer(host: str, port: int) -> list[ssrf.IPAddress]:
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(ssrf, "resolve", answer)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    loopback = ssrf.parse_networks("127.0.0.0/8")
    try:
        async with guarded_session(
            allow=loopback, max_connections=1, ssl_context=client_ctx
        ) as session:
            async with session.post(f"https://hook.example:{port}/hook", data=b"{}") as answer:
                assert await answer.text() == "ok"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not the cert's name
                await session.post(f"https://other.example:{port}/hook", data=b"{}")
        assert server.hosts == [f"hook.example:{port}"]
        assert server.sni[:2] == ["hook.example", "other.example"]
    finally:
        listener.close()
