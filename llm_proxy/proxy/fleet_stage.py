"""The /v1 stage that enforces `rate_limit_per_hour` and `max_requests` fleet-wide.

Used instead of `chain.RateLimitStage` when REDIS_URL is set. A call spends one unit
of its token's lease (`fleet_limits.FleetLimiter`); only when the lease is empty does
`enter` return an awaitable: one Redis round trip shared by every call waiting on the
token. While Redis is unreachable the in-process GCRA decides (the lifetime cap is
then the token table's own per-process count) or, with REDIS_FAILURE_MODE=closed,
calls without a lease get a 503.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable

from aiohttp import web

from ..auth.errors import quota_spent
from ..auth.tokens import Principal
from ..errors import ApiError, RateLimitedError, api_error
from ..keys import PRINCIPAL_KEY
from .chain import acquire_locally
from .exchange import Exchange
from .fleet_limits import FleetLimiter
from .leases import Lease, Refusal
from .ratelimit import Limiter

# Set on a call the in-process fallback admitted, so `leave` refunds the right limiter.
FALLBACK_KEY = web.RequestKey("fleet_fallback", bool)


class FleetLimitStage:
    """Per-token hourly rate and lifetime cap, shared by every process on one Redis."""

    __slots__ = ("default_per_hour", "fallback", "fleet")

    def __init__(
        self, fleet: FleetLimiter, fallback: Limiter, default_per_hour: int
    ) -> None:
        self.fleet = fleet
        self.fallback = fallback
        self.default_per_hour = default_per_hour

    def enter(self, request: web.Request, exchange: Exchange) -> Awaitable[None] | None:
        principal = request[PRINCIPAL_KEY]
        limit = principal.rate_limit_per_hour or self.default_per_hour
        fleet = self.fleet
        lease = fleet.lease_for(principal.token_id, limit, principal.max_requests)
        if fleet.take(principal.token_id, lease):
            exchange.rate_headers = _headers(limit, lease)
            return None
        if fleet.down:
            self._without_redis(request, exchange, principal, limit, lease)
            return None
        refusal = fleet.cached_refusal(lease)
        if refusal is not None:
            raise self._refused(refusal, limit, lease)
        return self._after_refill(request, exchange, principal, limit, lease)

    async def _after_refill(
        self,
        request: web.Request,
        exchange: Exchange,
        principal: Principal,
        limit: int,
        lease: Lease,
    ) -> None:
        if await self.fleet.refill(principal.token_id, lease):
            exchange.rate_headers = _headers(limit, lease)
            return
        if self.fleet.down:
            self._without_redis(request, exchange, principal, limit, lease)
            return
        refusal = lease.refusal
        if refusal is None:  # the fleet had room, others took it first
            refusal = Refusal("rate", self.fleet.now() + 1.0, 0.0)
        raise self._refused(refusal, limit, lease)

    def _without_redis(
        self,
        request: web.Request,
        exchange: Exchange,
        principal: Principal,
        limit: int,
        lease: Lease,
    ) -> None:
        """Redis is away: the in-process GCRA decides, or fail closed."""
        if self.fleet.fail_closed:
            self.fleet.stats.closed_refusals += 1
            raise ApiError(
                503,
                "Rate limits cannot be checked right now (Redis is unreachable and "
                "REDIS_FAILURE_MODE=closed); retry shortly.",
                type="api_error",
                code="rate_limiter_unavailable",
                headers={"Retry-After": "1"},
            )
        headers = acquire_locally(self.fallback, principal.token_id, limit)
        self.fleet.count_local(principal.token_id, lease)
        request[FALLBACK_KEY] = True
        exchange.rate_headers = headers

    def _refused(self, refusal: Refusal, limit: int, lease: Lease) -> ApiError:
        if refusal.limit == "quota":
            return api_error(quota_spent())  # as token auth answers it
        return RateLimitedError(
            f"Rate limit of {limit} requests per hour reached for this token.",
            retry_after_s=refusal.retry_after_s(self.fleet.now()),
            code="rate_limit_exceeded",
            extra=_headers(limit, lease),
        )

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """A call the proxy refused itself (413, model, breaker) gets its unit back."""
        if exchange.reached_upstream:
            return
        token_id = request[PRINCIPAL_KEY].token_id
        if request.get(FALLBACK_KEY):
            self.fallback.refund(token_id)
            self.fleet.uncount_local(token_id)
        else:
            self.fleet.give_back(token_id)


def _headers(limit: int, lease: Lease) -> dict[str, str]:
    """`x-ratelimit-*` as OpenAI sends them; remaining is what this process holds
    plus what the fleet had unleased at the last grant (an estimate, never a promise).
    """
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(lease.units + max(lease.room, 0)),
        "x-ratelimit-reset-requests": f"{math.ceil(lease.reset_after_s)}s",
    }
