"""`/health`, `/live` and `/ready`, with the database and Redis really there (or not)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from llm_proxy import __version__
from llm_proxy.keys import REPOSITORY_KEY

from ..support import REDIS_URL, FakeClock, require_redis

Client = TestClient[Any, Any]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_health_and_live_answer_without_dependencies(client: Client) -> None:
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["version"] == __version__
    assert health["timestamp"].endswith("Z")
    live = await client.get("/live")
    assert live.status == 200 and (await live.json())["status"] == "alive"


async def test_ready_checks_the_database(client: Client) -> None:
    ready = await client.get("/ready")
    body = await ready.json()
    assert ready.status == 200 and body["checks"]["database"] == "ok"
    assert "redis" not in body["checks"], "Redis is checked only when configured"
    await client.app[REPOSITORY_KEY].close()
    broken = await client.get("/ready")
    body = await broken.json()
    assert broken.status == 503 and body["failing"] == ["database"]


@pytest.mark.redis
async def test_ready_checks_redis_when_configured(
    make_client: Callable[..., Any],
) -> None:
    await require_redis()
    client = await make_client(REDIS_URL=REDIS_URL)
    ready = await client.get("/ready")
    assert ready.status == 200 and (await ready.json())["checks"]["redis"] == "ok"


async def test_ready_says_degraded_when_redis_does_not_answer(
    make_client: Callable[..., Any],
) -> None:
    """Redis away is degraded, not failing: limits fall back to the process."""
    client = await make_client(REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0")
    ready = await client.get("/ready")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "degraded"
    # the invalidation channel rides on the same Redis and is down with it
    assert sorted(body["degraded"]) == ["redis", "token_invalidation"]
    assert body["checks"]["redis"].startswith("degraded: Redis unreachable")


async def test_breaker_check_reads_ok_degraded_open_and_half_open() -> None:
    from llm_proxy.ops.readiness import breaker_check
    from llm_proxy.proxy.breaker import CircuitBreaker

    clock = FakeClock(100.0)
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    check = breaker_check(breaker)
    assert await check() == "ok"
    breaker.record_failure()
    opened = await check()
    assert opened.startswith("degraded: upstream circuit breaker open")
    assert "for about 30 s more" in opened
    clock.advance(31.0)
    assert breaker.allow()  # the cooldown is over: one probe goes through
    assert (await check()).startswith("degraded: upstream circuit breaker half-open")
