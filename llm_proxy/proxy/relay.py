"""Forwarding one call: the client's body, the upstream request, chunk-by-chunk relay.

Owns `proxy_handler`. The session and the sending live in `upstream.py`, the header
rules in `headers.py`, a token's policy checks in `policy.py`. Knows nothing of
tokens, limits or storage: what it needs (the upstream Authorization value, the
token's compiled policy, rate-limit headers) arrives in request keys.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Final

import aiohttp
import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from ..auth.policy import CallPolicy
from ..errors import (
    ApiError,
    IncompleteBodyError,
    RequestTooLargeError,
    UpstreamError,
    UpstreamPoolExhaustedError,
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
from .cors import add_cors_headers
from .exchange import Exchange
from .headers import (
    _forwarded_client,
    downstream_headers,
    media_type,
    upstream_headers,
)
from .multipart import FORM_HEAD_BYTES, form_boundary, form_field
from .policy import check_body, enforce_bindings
from .upstream import send_upstream

log = logging.getLogger(__name__)

JSON_PEEK_LIMIT: Final = 1024 * 1024
# aiohttp warns (a ResourceWarning) when given more raw bytes than this to send; a
# BytesIO of the same bytes is written in slices instead.
_LARGE_BYTES_BODY: Final = 1024 * 1024


class CountedBody:
    """The client's body as it streams upstream, counted against MAX_REQUEST_BYTES.

    One int add and one compare per chunk. A body that crosses the limit, or that the
    client cuts short, stops with an `ApiError` kept in `failure`: aiohttp then closes
    the upstream connection (a request whose body was not fully sent is never
    pooled), and the handler answers with `failure` instead of a 502.
    """

    __slots__ = ("_ahead", "_content", "_form", "_limit", "failure", "received")

    def __init__(
        self,
        content: aiohttp.StreamReader,
        limit: int,
        form: Exchange | None = None,
    ) -> None:
        self._content = content
        self._limit = limit
        self._form = form  # keeps the first bytes of a multipart body in `form_head`
        self._ahead: list[bytes] = []  # read by `read_head`, not yet sent
        self.received = 0
        self.failure: ApiError | None = None

    def __aiter__(self) -> CountedBody:
        return self

    async def read_head(self) -> None:
        """Read a form's first `FORM_HEAD_BYTES` (or all of a shorter one) before
        anything is sent, so its small fields can be checked; they are sent first."""
        ahead = self._ahead
        while self._form is not None:
            try:
                ahead.append(await self._next())
            except StopAsyncIteration:
                break
        ahead.reverse()  # popped from the end, in order

    async def __anext__(self) -> bytes:
        if self._ahead:
            return self._ahead.pop()
        return await self._next()

    async def _next(self) -> bytes:
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
# Notes what a body read whole says (model, stream); returns the body to send.
Peek = Callable[[bytes, Exchange], bytes]
# Failures to get a connection at all: the call never reached the upstream.
_NEVER_CONNECTED: Final = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


def _peeked(body: bytes, exchange: Exchange) -> bytes:
    """Note model and stream of a JSON body; the body with `include_usage` if due."""
    return _with_usage(body, _peek_json(body, exchange), exchange)


class _PolicedPeek:
    """`_peeked` under a token's policy: the body's fields are checked as well."""

    __slots__ = ("peeked", "policy")

    def __init__(self, policy: CallPolicy) -> None:
        self.policy = policy
        self.peeked = False

    def __call__(self, body: bytes, exchange: Exchange) -> bytes:
        self.peeked = True
        payload = _peek_json(body, exchange)
        check_body(self.policy, payload, exchange)
        return _with_usage(body, payload, exchange)

    async def settle(self, body: UpstreamBody, exchange: Exchange) -> None:
        """Judge a body not peeked at. A multipart form has its `model` and `stream`
        fields read from its first bytes (read ahead when it streams); any other
        body has no model the proxy can read, so a policy that limits models
        refuses it."""
        boundary = form_boundary(exchange.form_type)
        if boundary is not None and self.policy.reads_form:
            if isinstance(body, CountedBody):
                await body.read_head()
            head = exchange.form_head or b""
            exchange.model = form_field(head, boundary, b"model")
            exchange.stream = form_field(head, boundary, b"stream") == "true"
        check_body(self.policy, None, exchange)


def _with_usage(
    body: bytes, payload: dict[str, object] | None, exchange: Exchange
) -> bytes:
    """The body, with `include_usage` when a streamed usage call left it unset."""
    if payload is not None and exchange.stream and exchange.path in USAGE_ENDPOINTS:
        injected = inject_include_usage(body, payload)
        if injected is not None:
            exchange.usage_injected = True
            return injected
    return body


def _peek_json(body: bytes, exchange: Exchange) -> dict[str, object] | None:
    if len(body) <= JSON_PEEK_LIMIT:
        exchange.request_body = body
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


async def read_body(
    request: web.Request, exchange: Exchange, limit: int, peek: Peek = _peeked
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
    peeked = exchange.path in USAGE_ENDPOINTS or kind == "application/json"
    form = kind == "multipart/form-data"
    if form:
        exchange.form_type = content_type
    if not peeked and (length is None or length > JSON_PEEK_LIMIT):
        return CountedBody(request.content, limit, exchange if form else None)
    body = await _read_whole(request, limit)
    if peeked:
        body = peek(body, exchange)
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
    principal = request[PRINCIPAL_KEY]
    headers = upstream_headers(
        request.headers,
        principal.upstream_authorization,
        exchange.request_id,
        _forwarded_client(request, settings),
    )
    policy = principal.policy
    if policy is None:
        body = await read_body(request, exchange, settings.max_request_bytes)
    else:  # bound headers first, then the body's fields
        enforce_bindings(policy, request.headers, headers)
        peek = _PolicedPeek(policy)
        body = await read_body(request, exchange, settings.max_request_bytes, peek)
        if body is not None and not peek.peeked:  # a JSON body was judged already
            await peek.settle(body, exchange)
    if exchange.models is not None and not model_allowed(
        exchange.models, exchange.model
    ):
        raise refuse_model(exchange.model)
    # None unless RESPONSE_CACHE is on and the call may be answered from it or kept.
    plan = exchange.cache_plan
    if plan is not None:
        cached = await plan.lookup(request, exchange, body)
        if cached is not None:
            if exchange.cors is not None:
                add_cors_headers(cached.headers, exchange.cors)
            return cached
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
        if plan is not None:
            plan.answered(upstream, exchange)
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
    if exchange.cors is not None:
        add_cors_headers(headers, exchange.cors)
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
