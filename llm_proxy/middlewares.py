"""HTTP adapters for cross-cutting concerns, each a factory returning a middleware.

Root chain: `json_errors` (every error we generate is OpenAI-shaped JSON). The `/v1`
chain, outermost first: instrumentation (request id, the call's record, one event per
call, whatever the outcome), allowlist (cheapest,
needs no secret), token auth (a dict lookup), rate limit (needs the principal), circuit
breaker (innermost, so it counts only real upstream attempts). The maths lives in
`allowlist.py`, `tokens.py`, `ratelimit.py` and `breaker.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .allowlist import NOT_FOUND, Allowlist, MatchKind, normalise_path
from .breaker import CircuitBreaker
from .errors import (
    ApiError,
    CircuitOpenError,
    InvalidTokenError,
    NotAllowedError,
    RateLimitedError,
    UpstreamError,
)
from .exchange import Exchange
from .instrumentation import Instrumentation
from .keys import EXCHANGE_KEY, PRINCIPAL_KEY
from .proxy import request_id_of
from .ratelimit import Limiter
from .tokens import AuthFailure, TokenStore

log = logging.getLogger(__name__)

_MESSAGES = {
    404: ("Unknown path.", "not_found"),
    405: ("Method not allowed for this path.", "method_not_allowed"),
    413: ("The request body is too large.", "request_too_large"),
}


def json_errors_middleware() -> Middleware:
    """aiohttp's plain-text errors and unexpected exceptions become OpenAI JSON."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError:
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            raise _as_api_error(exc) from None
        except Exception:
            log.exception("unhandled error for %s %s", request.method, request.path)
            raise ApiError(
                500,
                "Internal error in llm-proxy.",
                type="api_error",
                code="internal_error",
            ) from None

    return json_errors


def _as_api_error(exc: web.HTTPException) -> ApiError:
    message, code = _MESSAGES.get(exc.status, (exc.reason, "http_error"))
    headers = {}
    if "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return ApiError(exc.status, message, code=code, headers=headers)


# -- the /v1 chain: instrumentation, allowlist, token auth, rate limit, circuit breaker --


def instrumentation_middleware(instrumentation: Instrumentation) -> Middleware:
    """Outermost on /v1: start the call's `Exchange`, hand it over when it ends.

    Every outcome is recorded, our own refusals (401/403/404/429/503) included, and
    the hand-over in `finally` is a synchronous append: no await, no parsing.
    """

    @web.middleware
    async def instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = Exchange(
            request_id_of(request.headers), time.perf_counter(), request.method
        )
        request[EXCHANGE_KEY] = record
        instrumentation.in_flight += 1
        try:
            return await handler(request)
        except ApiError as exc:
            _record_failure(record, exc.status, exc.code, type(exc).__name__)
            exc.headers["X-Request-ID"] = record.request_id
            raise
        except web.HTTPException as exc:
            _record_failure(record, exc.status, None, type(exc).__name__)
            raise
        except asyncio.CancelledError:
            _record_failure(record, 499, "client_disconnected", "CancelledError")
            raise
        except Exception as exc:
            _record_failure(record, 500, "internal_error", type(exc).__name__)
            raise
        finally:
            instrumentation.in_flight -= 1
            record.finished = time.perf_counter()
            principal = request.get(PRINCIPAL_KEY)
            if principal is not None:
                record.project_id = principal.project_id
                record.token_id = principal.token_id
            instrumentation.submit(record)

    return instrument


def _record_failure(
    record: Exchange, status: int, error: str | None, error_class: str
) -> None:
    """Note how a call failed, keeping what the relay set once the answer started."""
    if not record.status:
        record.status = status
    record.error = record.error or error
    record.error_class = record.error_class or error_class


def allowlist_middleware(allowlist: Allowlist) -> Middleware:
    """404 for paths outside the allowlist (and any path trick), 405 for methods."""

    @web.middleware
    async def allowlist_check(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        path = normalise_path(request.raw_path)
        exchange = request[EXCHANGE_KEY]
        # A refused path is recorded as it came, without its query.
        exchange.path = path if path is not None else request.raw_path.split("?")[0]
        verdict = (
            allowlist.match(request.method, path) if path is not None else NOT_FOUND
        )
        if verdict.kind is MatchKind.NOT_FOUND:
            raise NotAllowedError(
                404, "Unknown or forbidden path.", code="unknown_endpoint"
            )
        if verdict.kind is MatchKind.METHOD_NOT_ALLOWED:
            raise NotAllowedError(
                405,
                f"Method {request.method} is not allowed for this path.",
                code="method_not_allowed",
                headers={"Allow": verdict.allow_header},
            )
        exchange.endpoint = verdict.endpoint
        exchange.models = verdict.models
        return await handler(request)

    return allowlist_check


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme any case)."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_auth_middleware(store: TokenStore) -> Middleware:
    """Refuse unknown, expired, revoked or spent tokens; give back unused quota."""

    @web.middleware
    async def token_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        if token is None:
            raise InvalidTokenError(
                "Missing proxy token: send 'Authorization: Bearer <token>'.",
                code="missing_api_key",
            )
        try:
            principal = store.authenticate(token)
        except AuthFailure as failure:
            raise _auth_error(failure) from None
        request[PRINCIPAL_KEY] = principal
        try:
            return await handler(request)
        finally:
            if not request[EXCHANGE_KEY].reached_upstream:
                store.refund(principal)

    return token_auth


def _auth_error(failure: AuthFailure) -> ApiError:
    if failure.status == 401:
        return InvalidTokenError(failure.message, code=failure.code)
    if failure.status == 429:
        return RateLimitedError(
            failure.message, retry_after_s=3600, code=failure.code, extra={}
        )
    return NotAllowedError(failure.status, failure.message, code=failure.code)


def rate_limit_middleware(limiter: Limiter, default_per_hour: int) -> Middleware:
    """Per-token hourly window; 429 with Retry-After; headers on every answer."""

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        principal = request[PRINCIPAL_KEY]
        limit = principal.rate_limit_per_hour or default_per_hour
        decision = limiter.try_acquire(principal.token_id, limit)
        headers = {
            "x-ratelimit-limit-requests": str(decision.limit),
            "x-ratelimit-remaining-requests": str(decision.remaining),
            "x-ratelimit-reset-requests": f"{math.ceil(decision.reset_after_s)}s",
        }
        if not decision.allowed:
            raise RateLimitedError(
                f"Rate limit of {limit} requests per hour reached for this token.",
                retry_after_s=decision.retry_after_s,
                code="rate_limit_exceeded",
                extra=headers,
            )
        request[EXCHANGE_KEY].rate_headers = headers
        return await handler(request)

    return rate_limit


def circuit_breaker_middleware(breaker: CircuitBreaker) -> Middleware:
    """503 while the upstream is failing; counts only real upstream outcomes."""

    @web.middleware
    async def circuit_breaker(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if not breaker.allow():
            raise CircuitOpenError(breaker.retry_after_s())
        exchange = request[EXCHANGE_KEY]
        try:
            response = await handler(request)
        except UpstreamError:
            breaker.record_failure()
            raise
        if not exchange.reached_upstream:
            return response
        if exchange.status >= 500 or exchange.error not in (
            None,
            "client_disconnected",
        ):
            breaker.record_failure()
        else:
            breaker.record_success()
        return response

    return circuit_breaker
