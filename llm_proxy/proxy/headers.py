"""Header rules of the relay: what goes upstream, what comes back, request ids, client IPs.

Hop-by-hop headers (and those a `Connection` header names) never cross the proxy; the
client's credentials, OpenAI scope headers, cookies and address headers never go
upstream; upstream cookies never come back. Pure functions over header multidicts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from ..config import IpNetwork, Settings
from ..ids import id_sequence
from .exchange import Exchange

HOP_BY_HOP: Final = frozenset(
    name
    for name in (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
# Never forwarded upstream: our own credentials replace the client's, a token must not
# switch the project's OpenAI organisation or project, and client addresses stay here
# unless FORWARD_CLIENT_IP is on. aiohttp frames the body it is given and trusts a
# Content-Length it finds in the headers, so the client's framing never goes along.
REQUEST_DROP: Final = HOP_BY_HOP | frozenset(
    name
    for name in (
        "content-length",
        "host",
        "authorization",
        "openai-organization",
        "openai-project",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "forwarded",
        "cf-connecting-ip",
        "true-client-ip",
        "x-client-ip",
        "expect",
    )
)
# Never passed back: the shared session must not hand one tenant's cookies to another.
RESPONSE_DROP: Final = HOP_BY_HOP | frozenset(
    name for name in ("set-cookie", "set-cookie2", "x-request-id")
)
OUR_RATE_HEADERS: Final = frozenset(
    name
    for name in (
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    )
)
SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# A fresh request id: 12 hex digits of process prefix, then a hex counter (cheaper
# than uuid4; `id_sequence` says why that matters).
new_request_id: Final = id_sequence(prefix_bytes=6, counter_digits=8)


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's X-Request-ID when it is sane, else a fresh one."""
    given = headers.get("X-Request-ID")
    if given and SANE_REQUEST_ID.fullmatch(given):
        return given
    return new_request_id()


def _drop_connection_listed(
    headers: CIMultiDictProxy[str], out: CIMultiDict[str]
) -> None:
    """Headers named in `Connection` are hop-by-hop too (RFC 9110, section 7.6.1)."""
    connection = headers.get(hdrs.CONNECTION)
    if connection:
        for listed in connection.split(","):
            out.popall(listed.strip(), None)


def upstream_headers(
    headers: CIMultiDictProxy[str],
    authorization: str,
    request_id: str,
    client_ip: str | None,
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and scope headers, with our Authorization."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in REQUEST_DROP:
            out.add(name, value)
    _drop_connection_listed(headers, out)
    out[hdrs.AUTHORIZATION] = authorization
    out["X-Request-ID"] = request_id
    if client_ip:
        out[hdrs.X_FORWARDED_FOR] = client_ip
    return out


def client_address(
    remote: str | None, forwarded_for: str | None, trusted: tuple[IpNetwork, ...]
) -> str | None:
    """The client's address: the peer's, or behind trusted proxies, X-Forwarded-For's.

    When the peer is a trusted proxy, its `X-Forwarded-For` is read right to left
    and the first address not in `trusted` is the client (all trusted: the
    left-most). An entry that is not an IP address ends the search at the hop that
    sent it, whose address is the last one that can be believed.
    """
    if not trusted or not forwarded_for or not _is_trusted(remote, trusted):
        return remote
    client = remote
    for entry in reversed(forwarded_for.split(",")):
        address = _address(entry.strip())
        if address is None:
            return client
        client = str(address)
        if not _in(address, trusted):
            return client
    return client


def _is_trusted(remote: str | None, trusted: tuple[IpNetwork, ...]) -> bool:
    address = _address(remote) if remote is not None else None
    return address is not None and _in(address, trusted)


def _in(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    trusted: tuple[IpNetwork, ...],
) -> bool:
    return any(address in network for network in trusted)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`text` as an IP address (an IPv4-mapped one as IPv4), None if it is none."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _forwarded_client(request: web.Request, settings: Settings) -> str | None:
    """The address to send as X-Forwarded-For, when FORWARD_CLIENT_IP is on."""
    if not settings.forward_client_ip:
        return None
    forwarded = request.headers.getall(hdrs.X_FORWARDED_FOR, None)
    joined = ",".join(forwarded) if forwarded else None
    return client_address(request.remote, joined, settings.trusted_proxies)


def downstream_headers(
    headers: CIMultiDictProxy[str], exchange: Exchange, is_sse: bool
) -> CIMultiDict[str]:
    """Upstream headers minus hop-by-hop and cookies, plus ours."""
    out: CIMultiDict[str] = CIMultiDict()
    drop = RESPONSE_DROP | OUR_RATE_HEADERS if exchange.rate_headers else RESPONSE_DROP
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    _drop_connection_listed(headers, out)
    out.update(exchange.rate_headers)
    out["X-Request-ID"] = exchange.request_id
    if is_sse:
        out["X-Accel-Buffering"] = "no"
        out.setdefault(hdrs.CACHE_CONTROL, "no-cache")
    return out


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, lower case, without its parameters.

    aiohttp's `content_type` parses every parameter of the header on each access;
    the proxy only compares the media type, twice per call.
    """
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()
