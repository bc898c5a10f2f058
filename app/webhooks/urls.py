"""The SSRF gate: a webhook URL is http(s) and resolves only to public addresses.

Checked when an endpoint is created and again right before every attempt (DNS may change);
the attempt then connects to the very address checked (`Target.address`), so a name that
re-resolves between check and connect cannot reach an internal host.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.errors import InvalidRequest

SCHEMES = {"http": 80, "https": 443}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The check's name lookup (socket.getaddrinfo); tests replace it. Only the check resolves:
# the attempt connects to the address it returned, never looking the name up again.
lookup: Callable[..., list[Any]] = socket.getaddrinfo


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # as written (the Host header and the TLS server name)
    port: int
    address: str  # the checked IP the attempt connects to


def check_url(url: str, *, allow_private: bool) -> Target:
    """The URL's target, or InvalidRequest (param `url`) naming why it is refused."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise InvalidRequest(
            f"a webhook url is http:// or https:// with a host; got {url!r}", param="url"
        )
    try:
        port = parts.port or SCHEMES[parts.scheme]
    except ValueError:
        raise InvalidRequest(
            f"the webhook url's port is not a number: {url!r}", param="url"
        ) from None
    addresses = _resolve(parts.hostname, port)
    refused = [ip for ip in addresses if not _public(ip)]
    if refused and not allow_private:
        raise InvalidRequest(
            f"the webhook url's host {parts.hostname!r} resolves to {refused[0]}, a loopback, "
            "link-local or private address; set LORAFORGE_WEBHOOK_ALLOW_PRIVATE=true to allow it",
            param="url",
            code="webhook_url_not_public",
        )
    return Target(url, parts.scheme, parts.hostname, port, str(addresses[0]))


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = lookup(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidRequest(
            f"the webhook url's host {host!r} does not resolve: {exc}", param="url"
        ) from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise InvalidRequest(f"the webhook url's host {host!r} has no address", param="url")
    return addresses


def _public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast
