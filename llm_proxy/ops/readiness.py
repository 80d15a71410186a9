"""Extra `/ready` checks: Redis when configured, the upstream breaker's state.

A check answers `ok`, `degraded: <why>` (still ready) or `failing: <why>` (not ready).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Final

from aiohttp import web

from ..keys import ReadyCheck
from ..proxy.breaker import BreakerState, CircuitBreaker

REDIS_PING_TIMEOUT_S: Final = 2.0


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


class RedisCheck:
    """Pings REDIS_URL on each /ready call over one lazily opened client."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._client: Any = None

    async def __call__(self) -> str:
        try:
            if self._client is None:
                from redis.asyncio import Redis  # redis only when configured

                self._client = Redis.from_url(
                    self._url, socket_connect_timeout=REDIS_PING_TIMEOUT_S
                )
            await asyncio.wait_for(self._client.ping(), REDIS_PING_TIMEOUT_S)
        except Exception as exc:  # any failure means "not ready"; say which part
            return f"failing: {type(exc).__name__}"
        return "ok"

    async def close(self) -> None:
        """Close the client, if one was opened."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def close_on_cleanup(self, _: web.Application) -> None:
        """`app.on_cleanup` hook."""
        await self.close()
