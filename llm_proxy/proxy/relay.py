"""Forwarding to the upstream: the pooled session, header rules, chunk-by-chunk relay.

Owns `upstream_session_ctx`, `proxy_handler` and the one place where aiohttp client
exceptions become our 502/504 errors. Knows nothing of tokens, limits or storage: what
it needs (the upstream Authorization value, rate-limit headers) arrives in request keys.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import itertools
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import IpNetwork, Settings
from ..errors import (
    ApiError,
    IncompleteBodyError,
    RequestTooLargeError,
    UpstreamError,
    UpstreamPoolExhaustedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ..keys import (
    EXCHANGE_KEY,
    PRINCIPAL_KEY,
    SETTINGS_KEY,
    UPSTREAM_SESSION_KEY,
)
from .allowlist import model_allowed
from .capture import (
    USAGE_ENDPOINTS,
    ResponseCapture,
    UsageChunkStripper,
    inject_include_usage,
)
from .exchange import Exchange
from .multipart import FORM_HEAD_BYTES

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.tracing import Trace

log = logging.getLogger(__name__)

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
JSON_PEEK_LIMIT: Final = 1024 * 1024
# aiohttp warns (a ResourceWarning) when given more raw bytes than this to send; a
# BytesIO of the same bytes is written in slices instead.
_LARGE_BYTES_BODY: Final = 1024 * 1024


# aiohttp adds Accept, Accept-Encoding, User-Agent and a Content-Type that the client
# did not send, unless told to skip them; a session-wide skip list makes it rebuild and
# merge that list on every request (2.4 µs, about 2% of the proxy's time under load).
_NO_AUTO_HEADERS: Final = CIMultiDict[None](
    (name, None)
    for name in (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
)


class TransparentRequest(aiohttp.ClientRequest):
    """An upstream request with the client's headers only: none of aiohttp's defaults."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


class PoolWaitTimeout(aiohttp.ClientError):
    """No pooled upstream connection came free within the pool timeout."""


class BoundedWaitConnector(aiohttp.TCPConnector):
    """The TCP pool, with its wait for a free connection bounded on its own.

    aiohttp 3.14 has no pool-wait setting: `ClientTimeout.connect` bounds the wait and
    the creation of the connection together, so a slow TCP connect and a full pool
    would raise the same timeout. Bounding only the wait (entered only when the pool
    is full: no cost otherwise) keeps `sock_connect` the one limit on connecting, and
    `PoolWaitTimeout` is no `TimeoutError`, so it cannot pass for one.
    """

    def __init__(self, *, pool_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_timeout_s = pool_timeout_s

    async def _wait_for_available_connection(
        self, key: ConnectionKey, traces: list[Trace]
    ) -> None:
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError:
            raise PoolWaitTimeout(
                f"no free upstream connection within {self._pool_timeout_s} s"
            ) from None


def new_upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The one pooled session: no total timeout, no cookies, no decompression."""
    upstream = settings.upstream
    connector = BoundedWaitConnector(
        pool_timeout_s=upstream.pool_timeout_s,
        limit=upstream.max_connections,
        limit_per_host=0,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
        ttl_dns_cache=300,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=upstream.connect_timeout_s,
        sock_read=upstream.read_idle_timeout_s,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        request_class=TransparentRequest,
        raise_for_status=False,
    )


async def upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the pooled session on start, close it (and its sockets) on shutdown."""
    session = new_upstream_session(app[SETTINGS_KEY])
    app[UPSTREAM_SESSION_KEY] = session
    yield
    await session.close()


# A random per-process prefix and a counter: unique across processes and restarts,
# and about ten times cheaper than uuid4 (one os.urandom syscall per request), which
# showed up at 2.5% of the proxy's CPU in a py-spy profile under load.
_REQUEST_ID_PREFIX: Final = os.urandom(6).hex()
_request_ids = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id: 12 hex digits of process prefix, then a hex counter."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_ids):08x}"


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


class CountedBody:
    """The client's body as it streams upstream, counted against MAX_REQUEST_BYTES.

    One int add and one compare per chunk. A body that crosses the limit, or that the
    client cuts short, stops with an `ApiError` kept in `failure`: aiohttp then closes
    the upstream connection (a request whose body was not fully sent is never
    pooled), and the handler answers with `failure` instead of a 502.
    """

    __slots__ = ("_content", "_form", "_limit", "failure", "received")

    def __init__(
        self,
        content: aiohttp.StreamReader,
        limit: int,
        form: Exchange | None = None,
    ) -> None:
        self._content = content
        self._limit = limit
        self._form = form  # keeps the first bytes of a multipart body in `form_head`
        self.received = 0
        self.failure: ApiError | None = None

    def __aiter__(self) -> CountedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except (ConnectionResetError, HttpProcessingError) as exc:
            self.failure = IncompleteBodyError()
            raise self.failure from exc
        if not chunk:
            raise StopAsyncIteration
        self.received += len(chunk)
        if self.received > self._limit:
            self.failure = RequestTooLargeError(self._limit)
            raise self.failure
        if self._form is not None:
            self._keep_head(self._form, chunk)
        return chunk

    def _keep_head(self, form: Exchange, chunk: bytes) -> None:
        head = (form.form_head or b"") + chunk
        form.form_head = head[:FORM_HEAD_BYTES]
        if len(head) >= FORM_HEAD_BYTES:
            self._form = None


UpstreamBody = bytes | io.BytesIO | CountedBody | None
# Failures to get a connection at all: the call never reached the upstream.
_NEVER_CONNECTED: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


async def read_body(
    request: web.Request, exchange: Exchange, limit: int
) -> UpstreamBody:
    """The body to send upstream: None, the bytes read whole, or a counted stream.

    Any body over `limit` (MAX_REQUEST_BYTES) is refused with a 413: a declared
    length at once, a chunked one as soon as the count crosses it. The bodies of
    the usage endpoints (whatever their Content-Type) and JSON bodies are read
    whole to peek at `model` and `stream`; a streamed chat or completions call
    whose client left `include_usage` unset is sent with it (see
    `capture.inject_include_usage`), so usage is exact. Other small bodies are read
    whole too (sent with their exact length, without holding an upstream connection
    while the client sends them); the rest streams through.
    """
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLargeError(limit)
    content_type = request.headers.get(hdrs.CONTENT_TYPE)
    kind = media_type(content_type)
    peek = exchange.path in USAGE_ENDPOINTS or kind == "application/json"
    form = kind == "multipart/form-data"
    if form:
        exchange.form_type = content_type
    if not peek and (length is None or length > JSON_PEEK_LIMIT):
        return CountedBody(request.content, limit, exchange if form else None)
    body = await _read_whole(request, limit)
    if peek:
        body = _peeked(body, exchange)
    elif form:
        exchange.form_head = body[:FORM_HEAD_BYTES]
    return io.BytesIO(body) if len(body) > _LARGE_BYTES_BODY else body


async def _read_whole(request: web.Request, limit: int) -> bytes:
    """The whole body; aiohttp stops at `client_max_size`, which is `limit`."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(limit) from None
    except (ConnectionResetError, HttpProcessingError) as exc:
        raise IncompleteBodyError() from exc


def _peeked(body: bytes, exchange: Exchange) -> bytes:
    """Note model and stream of a JSON body; the body with `include_usage` if due."""
    if len(body) <= JSON_PEEK_LIMIT:
        exchange.request_body = body
    payload = _peek_json(body, exchange)
    if payload is not None and exchange.stream and exchange.path in USAGE_ENDPOINTS:
        injected = inject_include_usage(body, payload)
        if injected is not None:
            exchange.usage_injected = True
            return injected
    return body


def _peek_json(body: bytes, exchange: Exchange) -> dict[str, object] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    exchange.model = model if isinstance(model, str) else None
    exchange.stream = data.get("stream") is True
    return data


async def send_upstream(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    body: UpstreamBody,
    retries: int,
) -> aiohttp.ClientResponse:
    """Send once, retrying only connection failures that happened before any byte left.

    A full pool is not retried: waiting again would only queue the call longer.
    """
    for attempt in range(retries + 1):
        try:
            return await session.request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except PoolWaitTimeout as exc:
            raise UpstreamPoolExhaustedError() from exc
        except aiohttp.ClientConnectorError as exc:
            if attempt == retries:
                raise UpstreamUnavailableError() from exc
            await asyncio.sleep(0.05 * 2**attempt * (0.5 + random.random()))
        except TimeoutError as exc:
            raise UpstreamTimeoutError() from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError() from exc
    raise AssertionError("unreachable")  # pragma: no cover


def upstream_url(base: str, path: str, raw_path: str) -> URL:
    """The base URL (with its path prefix), the checked path, the query as sent.

    `path` matched the allowlist, whose templates admit only URL-safe characters, and
    the raw query comes from the request line the HTTP parser accepted, so the string
    is already a valid encoded URL: building it needs no yarl parsing per request.
    """
    _, mark, query = raw_path.partition("?")
    return URL(f"{base}{path}{mark}{query}", encoded=True)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Forward one request upstream and relay the response chunk by chunk."""
    settings = request.app[SETTINGS_KEY]
    exchange = request[EXCHANGE_KEY]
    body = await read_body(request, exchange, settings.max_request_bytes)
    if exchange.models is not None and not model_allowed(
        exchange.models, exchange.model
    ):
        raise refuse_model(exchange.model)
    headers = upstream_headers(
        request.headers,
        request[PRINCIPAL_KEY].upstream_authorization,
        exchange.request_id,
        _forwarded_client(request, settings),
    )
    if isinstance(body, CountedBody) and request.content_length is not None:
        # aiohttp's parser delivers exactly this many bytes or fails the stream.
        headers[hdrs.CONTENT_LENGTH] = str(request.content_length)
    if exchange.usage_injected:
        # The usage-only chunk we asked for must be taken out again, which needs the
        # stream uncompressed; identity is acceptable to every client.
        headers[hdrs.ACCEPT_ENCODING] = "identity"
    url = upstream_url(settings.upstream.base_text, exchange.path, request.raw_path)
    exchange.upstream_started = time.perf_counter()
    exchange.reached_upstream = True
    try:
        upstream = await send_upstream(
            request.app[UPSTREAM_SESSION_KEY],
            request.method,
            url,
            headers,
            body,
            settings.upstream.retries,
        )
    except UpstreamPoolExhaustedError:
        exchange.reached_upstream = False  # it never left the proxy: no quota spent
        raise
    except UpstreamError as exc:
        if isinstance(body, CountedBody) and body.failure is not None:
            # The client's body failed, not the upstream: no breaker count, no quota.
            exchange.reached_upstream = False
            raise body.failure from None
        if isinstance(exc.__cause__, _NEVER_CONNECTED):
            exchange.reached_upstream = False  # nothing was sent
        raise
    async with upstream:
        return await relay(request, upstream, exchange)


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
) -> web.StreamResponse:
    """Send upstream's status and headers at once, then each chunk as it arrives."""
    exchange.status = upstream.status
    content_type = media_type(upstream.headers.get(hdrs.CONTENT_TYPE))
    is_sse = content_type == "text/event-stream"
    exchange.content_encoding = upstream.headers.get(hdrs.CONTENT_ENCODING)
    headers = downstream_headers(upstream.headers, exchange, is_sse)
    stripper = _usage_stripper(upstream.status, exchange, is_sse)
    if stripper is not None:
        headers.popall(hdrs.CONTENT_LENGTH, None)
    response = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=headers
    )
    if upstream.content_length is not None and stripper is None:
        response.content_length = upstream.content_length
    exchange.capture = _capture_for(content_type, exchange, request, is_sse)
    try:
        await response.prepare(request)
    except ConnectionResetError as exc:  # the client left before the status line
        exchange.error = "client_disconnected"
        exchange.error_class = type(exc).__name__
        return response
    try:
        await _relay_body(upstream, response, exchange, stripper)
    except (
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectionError,
        TimeoutError,
    ) as exc:
        exchange.error = "upstream_stream_interrupted"
        exchange.error_class = type(exc).__name__
        log.warning(
            "stream from upstream ended early after %d bytes: %r",
            exchange.bytes_out,
            exc,
        )
    except ConnectionResetError as exc:
        exchange.error = "client_disconnected"
        exchange.error_class = type(exc).__name__
        log.info("client went away after %d bytes: %r", exchange.bytes_out, exc)
    finally:
        exchange.upstream_finished = time.perf_counter()
    if exchange.error is None:
        await response.write_eof()
    elif request.transport is not None:
        # Never end a cut stream cleanly: without the closing chunk the client sees
        # the interruption instead of a short but complete-looking answer.
        request.transport.abort()
    return response


async def _relay_body(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    exchange: Exchange,
    stripper: UsageChunkStripper | None,
) -> None:
    """The chunk loop: capture (bounded), strip injected usage, write, count."""
    capture = exchange.capture
    async for chunk in upstream.content.iter_any():
        if capture is not None:
            capture.feed(chunk)
        if stripper is not None:
            chunk = stripper.feed(chunk)
            if not chunk:
                continue
        if exchange.ttfb_s is None:
            exchange.ttfb_s = time.perf_counter() - exchange.started
        await response.write(chunk)
        exchange.bytes_out += len(chunk)
    if stripper is not None:
        rest = stripper.flush()
        if rest:
            await response.write(rest)
            exchange.bytes_out += len(rest)


def _usage_stripper(
    status: int, exchange: Exchange, is_sse: bool
) -> UsageChunkStripper | None:
    """A stripper when we asked for usage the client did not ask for."""
    if not exchange.usage_injected or status != 200:
        return None
    if not is_sse or exchange.content_encoding:
        return None
    return UsageChunkStripper()


def _capture_for(
    content_type: str, exchange: Exchange, request: web.Request, is_sse: bool
) -> ResponseCapture | None:
    """Bounded capture of JSON and SSE answers (usage, estimates, logged bodies)."""
    if is_sse:
        exchange.response_kind = "sse"
        limit = request.app[SETTINGS_KEY].events.stream_capture_max_bytes
        return ResponseCapture(limit)
    if content_type == "application/json":
        exchange.response_kind = "json"
        return ResponseCapture(JSON_PEEK_LIMIT)
    return None


def refuse_model(model: str | None) -> ApiError:
    """403 for a model this endpoint does not allow."""
    return ApiError(
        403,
        f"The model {model!r} is not allowed through this proxy.",
        param="model",
        code="model_not_allowed",
    )
