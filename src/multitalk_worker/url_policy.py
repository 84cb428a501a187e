"""One policy for every hop of a fetch: the first URL and each redirect's Location.

A URL is fetched when its scheme is https, it carries no credentials, its port is a valid TCP port and every
address its host resolves to is public. Addresses are judged with the standard library's `ipaddress`, after
unwrapping the IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
`::a.b.c.d`, 6to4 `2002::/16`, Teredo `2001::/32`, NAT64 `64:ff9b::/96`): `2002:a9fe:a9fe::1` is the
link-local 169.254.169.254 and is refused like it. Loopback passes only when the settings allow it (tests).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use: any IPv4 behind it
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (:: and ::1 are judged as IPv6)


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    host: str
    port: int


class UrlRefused(ValueError):
    """The URL breaks the policy; the message says what is wrong and what is accepted."""


def check_url(url: str) -> CheckedUrl:
    """Scheme, credentials, host and port of one hop (no DNS). Raises UrlRefused."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise UrlRefused(f"only https URLs are fetched (got {parts.scheme or 'no scheme'}://)")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in URLs are not accepted")
    if not parts.hostname:
        raise UrlRefused("URL has no host")
    return CheckedUrl(url, parts.hostname, _port(parts))


def _port(parts: SplitResult) -> int:
    try:
        port = parts.port
    except ValueError:
        port = None
        valid = False
    else:
        valid = port is None or 1 <= port <= 65535
    if not valid:
        raise UrlRefused(f"port {parts.netloc.rpartition(':')[2]!r} is not a TCP port (1-65535)")
    return port or 443


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo client, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is where the traffic goes
    if address in NAT64_PREFIX or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_problem(text: str, *, allow_loopback: bool) -> str | None:
    """Why `text` may not be dialled, or None when it is public. Every wrapped IPv4 is judged too."""
    try:
        address: IPAddress = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    inner = embedded_ipv4(address)
    if inner is not None:
        problem = address_problem(str(inner), allow_loopback=allow_loopback)
        return None if problem is None else f"it wraps {inner}, {problem}"
    if isinstance(address, ipaddress.IPv6Address) and address in NAT64_LOCAL:
        return "a local-use NAT64 address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address.is_multicast or not address.is_global:
        return "not a public address"
    return None


class UnresolvedHost(OSError):
    """The host name does not resolve."""


def checked_address(host: str, port: int, *, allow_loopback: bool) -> str:
    """The address to dial for `host`: the first it resolves to, once every one it resolves to has passed
    `address_problem` (a host with one private address among public ones is refused). Raises UrlRefused
    naming the address and the problem, or UnresolvedHost."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UnresolvedHost(f"cannot resolve host {host}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        problem = address_problem(address, allow_loopback=allow_loopback)
        if problem is not None:
            raise UrlRefused(f"{host} resolves to {address}, {problem}")
    return addresses[0]
