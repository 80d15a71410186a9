"""The /v1 chain: the stages a proxied call passes before the relay, and after it.

`proxy_chain`, outermost first: instrumentation (request id, the call's record, one
event per call, whatever the outcome) with the `Origin` gate (CORS), allowlist
(cheapest, needs no secret), token auth (a dict lookup; the token's project's origin
rule), rate limit (needs the principal), concurrency (calls in flight per token and
project), circuit breaker (innermost, so it counts only real upstream attempts). Each
link is a `Stage` of plain calls; the maths lives in `allowlist.py`, `auth/tokens.py`,
`cors.py`, `ratelimit.py`, `concurrency.py` and `breaker.py`, the answers to refusals
in `errors.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from ..auth.bearer import bearer_token
from ..auth.errors import AuthError
from ..auth.tokens import Principal, TokenStore
from ..errors import (
    ApiError,
    CircuitOpenError,
    NotAllowedError,
    RateLimitedError,
    UpstreamError,
    api_error,
    as_api_error,
    internal_error,
)
from ..keys import EXCHANGE_KEY, PRINCIPAL_KEY
from .allowlist import NOT_FOUND, Allowlist, Match, MatchKind, normalise_path
from .breaker import CircuitBreaker
from .concurrency import InFlight, Scope
from .exchange import Exchange
from .headers import request_id_of
from .ratelimit import Limiter

log = logging.getLogger(__name__)


class Stage(Protocol):
    """One link of the /v1 chain: may refuse a call before it goes upstream.

    `enter` runs in chain order and raises an `ApiError` to refuse; `leave` runs in
    reverse order for each stage whose `enter` returned, with the exception that
    ended the call (None when it was answered), so a stage can undo or record.
    Both are synchronous: the chain's only awaits are the client's and upstream's I/O,
    and one exception: `enter` may return an awaitable to finish its decision (the
    fleet limits' Redis call when a lease is empty); the stage counts as entered once
    it has completed.
    """

    def enter(
        self, request: web.Request, exchange: Exchange
    ) -> Awaitable[None] | None: ...

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None: ...


class CallSink(Protocol):
    """Where the chain hands each finished call (the accounting's `Instrumentation`).

    `in_flight` counts calls inside the chain; `submit` takes a call's record once its
    answer is decided and must not block: it runs in the request's coroutine.
    """

    in_flight: int

    def submit(self, exchange: Exchange) -> None: ...


class OriginGate(Protocol):
    """What the chain asks about a call's `Origin` header (CORS: `cors.CorsPolicy`).

    `admit` runs before the stages for a call with an `Origin` (it keeps the origin on
    the `Exchange`); `check` in token auth, for a call with an `Origin` or a principal
    with an origin rule (it may refuse); `decorate` gives the proxy's own error
    answer to an allowed origin its CORS headers. A call without `Origin` costs one
    header lookup and, in token auth, two attribute tests.
    """

    def admit(self, exchange: Exchange, origin: str) -> None: ...

    def check(self, principal: Principal, exchange: Exchange) -> None: ...

    def decorate(self, error: ApiError, exchange: Exchange) -> None: ...


def proxy_chain(
    instrumentation: CallSink,
    stages: Sequence[Stage],
    handler: Handler,
    origins: OriginGate | None = None,
) -> Handler:
    """The /v1 handler: the stages around `handler`, instrumented, in one coroutine.

    The outermost link starts the call's `Exchange` and hands it over when the call
    ends, whatever the outcome (our own refusals included); the hand-over is a
    synchronous append: no await, no parsing. Running the stages as plain calls
    instead of nested middleware coroutines keeps every resume of the relay loop
    from passing through five more frames. `origins` sees each call's `Origin` first
    (not a stage: a call without one must cost no more than the header lookup).
    """
    chain = tuple(stages)

    async def proxy_call(request: web.Request) -> web.StreamResponse:
        record = Exchange(
            request_id_of(request.headers), time.perf_counter(), request.method
        )
        request[EXCHANGE_KEY] = record
        instrumentation.in_flight += 1
        entered = 0
        error: BaseException | None = None
        try:
            if origins is not None:
                origin = request.headers.get(hdrs.ORIGIN)
                if origin is not None:
                    origins.admit(record, origin)
            for stage in chain:
                pending = stage.enter(request, record)
                if pending is not None:
                    await pending
                entered += 1
            return await handler(request)
        except BaseException as exc:
            error = exc
            _record_outcome(record, exc)
            if origins is not None and isinstance(exc, ApiError):
                origins.decorate(exc, record)  # for an allowed origin: its headers
            raise
        finally:
            if entered:
                _leave(chain[:entered], request, record, error)
            instrumentation.in_flight -= 1
            record.finished = time.perf_counter()
            principal = request.get(PRINCIPAL_KEY)
            if principal is not None:
                record.project_id = principal.project_id
                record.token_id = principal.token_id
            instrumentation.submit(record)

    return proxy_call


def _leave(
    entered: Sequence[Stage],
    request: web.Request,
    record: Exchange,
    error: BaseException | None,
) -> None:
    """Leave the entered stages, innermost first; a failing one is logged, not fatal.

    The answer is decided by now: a bug in one stage's `leave` must not skip the
    others (a quota refund, the breaker's count) nor the call's event.
    """
    for stage in reversed(entered):
        try:
            stage.leave(request, record, error)
        except Exception:
            log.exception(
                "stage %s failed to leave call %s",
                type(stage).__name__,
                record.request_id,
            )


def _record_outcome(record: Exchange, exc: BaseException) -> None:
    """Note how a call failed; an `ApiError` also gets the call's request id.

    An answer we make ourselves is sent after the call's record is handed over, so
    its body's length is counted here (when nothing of an answer was sent before).
    """
    if isinstance(exc, ApiError):
        _record_failure(record, exc.status, exc.code, type(exc).__name__)
        exc.headers["X-Request-ID"] = record.request_id
        _count_body(record, exc)
    elif isinstance(exc, web.HTTPException):
        _record_failure(record, exc.status, None, type(exc).__name__)
        _count_body(record, as_api_error(exc))
    elif isinstance(exc, asyncio.CancelledError):
        _record_failure(record, 499, "client_disconnected", "CancelledError")
    elif isinstance(exc, Exception):
        _record_failure(record, 500, "internal_error", type(exc).__name__)
        _count_body(record, internal_error())


def _count_body(record: Exchange, answer: web.HTTPException) -> None:
    if not record.bytes_out and isinstance(answer.body, bytes):
        record.bytes_out = len(answer.body)


def _record_failure(
    record: Exchange, status: int, error: str | None, error_class: str
) -> None:
    """Note how a call failed, keeping what the relay set once the answer started."""
    if not record.status:
        record.status = status
    record.error = record.error or error
    record.error_class = record.error_class or error_class


class AllowlistStage:
    """404 for paths outside the allowlist (and any path trick), 405 for methods."""

    __slots__ = ("allowlist",)

    def __init__(self, allowlist: Allowlist) -> None:
        self.allowlist = allowlist

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        path = normalise_path(request.raw_path)
        # A refused path is recorded as it came, without its query.
        exchange.path = path if path is not None else request.raw_path.split("?")[0]
        verdict = (
            self.allowlist.match(request.method, path)
            if path is not None
            else NOT_FOUND
        )
        if verdict.kind is MatchKind.NOT_FOUND:
            raise unknown_endpoint()
        if verdict.kind is MatchKind.METHOD_NOT_ALLOWED:
            raise method_not_allowed(request.method, verdict)
        exchange.endpoint = verdict.endpoint
        exchange.models = verdict.models

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """Nothing to undo."""


def unknown_endpoint() -> NotAllowedError:
    """404 for a path outside the allowlist (or a path trick)."""
    return NotAllowedError(404, "Unknown or forbidden path.", code="unknown_endpoint")


def method_not_allowed(method: str, verdict: Match) -> NotAllowedError:
    """405 for a method the allowlist does not allow on this path, with `Allow`."""
    return NotAllowedError(
        405,
        f"Method {method} is not allowed for this path.",
        code="method_not_allowed",
        headers={"Allow": verdict.allow_header},
    )


class TokenAuthStage:
    """Refuse unknown, expired, revoked or spent tokens, and calls from origins the
    token's project does not allow (`origins`); give back unused quota."""

    __slots__ = ("origins", "store")

    def __init__(self, store: TokenStore, origins: OriginGate | None = None) -> None:
        self.store = store
        self.origins = origins

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        token = bearer_token(request.headers.get(hdrs.AUTHORIZATION))
        try:
            principal = self.store.authenticate(token)
        except AuthError as refused:
            raise api_error(refused) from None
        request[PRINCIPAL_KEY] = principal
        if principal.origins is not None or exchange.origin is not None:
            self._check_origin(principal, exchange)

    def _check_origin(self, principal: Principal, exchange: Exchange) -> None:
        """The project's origin rule; a refusal gives the reserved request back."""
        if self.origins is None:
            return
        try:
            self.origins.check(principal, exchange)
        except ApiError:
            self.store.refund(principal)
            raise

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """A call that reached the upstream is counted; any other gives its quota back."""
        if exchange.reached_upstream:
            self.store.spend(request[PRINCIPAL_KEY])
        else:
            self.store.refund(request[PRINCIPAL_KEY])


def acquire_locally(limiter: Limiter, token_id: str, limit: int) -> dict[str, str]:
    """One slot of the in-process window: its rate-limit headers, or a 429 with them."""
    decision = limiter.try_acquire(token_id, limit)
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
    return headers


class RateLimitStage:
    """Per-token hourly window; 429 with Retry-After; headers on every answer.

    A slot is spent by a call that reached the upstream; one the proxy refused
    after granting it is given back, as `TokenAuthStage` does with the quota.
    """

    __slots__ = ("default_per_hour", "limiter")

    def __init__(self, limiter: Limiter, default_per_hour: int) -> None:
        self.limiter = limiter
        self.default_per_hour = default_per_hour

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        principal = request[PRINCIPAL_KEY]
        limit = principal.rate_limit_per_hour or self.default_per_hour
        exchange.rate_headers = acquire_locally(self.limiter, principal.token_id, limit)

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """A call the proxy refused itself (413, model, breaker) gets its slot back."""
        if not exchange.reached_upstream:
            self.limiter.refund(request[PRINCIPAL_KEY].token_id)


class ConcurrencyStage:
    """429 at once (no queue) when the token or its project has its cap in flight.

    A slot is held from `enter` until the call ends, a stream until its last byte or
    the client leaving; `leave` runs for every admitted call, whatever the outcome.
    """

    __slots__ = ("in_flight", "project_default", "token_default")

    def __init__(
        self, in_flight: InFlight, token_default: int, project_default: int
    ) -> None:
        self.in_flight = in_flight
        self.token_default = token_default
        self.project_default = project_default

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        principal = request[PRINCIPAL_KEY]
        token_cap = principal.max_concurrent or self.token_default
        project_cap = principal.project_max_concurrent or self.project_default
        refused = self.in_flight.try_enter(
            principal.token_id, token_cap, principal.project_id, project_cap
        )
        if refused is not None:
            cap = token_cap if refused == "token" else project_cap
            raise _concurrency_error(refused, cap)

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """The call's slot is free again."""
        principal = request[PRINCIPAL_KEY]
        self.in_flight.leave(principal.token_id, principal.project_id)


def _concurrency_error(scope: Scope, cap: int) -> RateLimitedError:
    owner = "This token" if scope == "token" else "This token's project"
    return RateLimitedError(
        f"{owner} already has {cap} calls in flight, its limit; retry when one ends.",
        retry_after_s=1,
        code="concurrency_limit_exceeded",
        extra={},
    )


class CircuitBreakerStage:
    """503 while the upstream is failing; counts only real upstream outcomes."""

    __slots__ = ("breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        if not self.breaker.allow():
            raise CircuitOpenError(self.breaker.retry_after_s())

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        if error is not None:
            if isinstance(error, UpstreamError):
                self.breaker.record_failure()
            return
        if not exchange.reached_upstream:
            return
        if exchange.status >= 500 or exchange.error not in (
            None,
            "client_disconnected",
        ):
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
