"""Extra `/ready` checks: the upstream breaker's state (Redis: `FleetLimiter.readiness`).

A check answers `ok`, `degraded: <why>` (still ready) or `failing: <why>` (not ready).
"""

from __future__ import annotations

import math

from ..keys import ReadyCheck
from ..proxy.breaker import BreakerState, CircuitBreaker


def breaker_check(breaker: CircuitBreaker) -> ReadyCheck:
    """The breaker state: `degraded` while not closed, never a readiness failure.

    Every instance shares the upstream, so taking this one out of the load balancer
    would help nobody; `/v1` calls get a fast 503 `circuit_open` meanwhile.
    """

    async def check() -> str:
        state = breaker.state
        if state is BreakerState.CLOSED:
            return "ok"
        if state is BreakerState.HALF_OPEN:
            return "degraded: upstream circuit breaker half-open, one probe call let through"
        wait = math.ceil(breaker.retry_after_s())
        return (
            "degraded: upstream circuit breaker open after repeated upstream failures;"
            f" /v1 calls answer 503 circuit_open for about {wait} s more"
        )

    return check
