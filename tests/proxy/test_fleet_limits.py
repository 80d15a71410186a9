"""Fleet limits against a real Redis: the lease script, two limiters sharing a token,
release, the whole app in fleet mode, and Redis going away and coming back.

The outage tests run their own `redis-server` on a free port (never the shared one).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.crc import key_slot

from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import FLEET_LIMITER_KEY, TOKEN_SYNC_KEY
from llm_proxy.proxy.fleet_limits import FleetLimiter, token_keys
from llm_proxy.proxy.leases import Lease
from llm_proxy.server import free_port

from ..support import (
    AUTH,
    REDIS_URL,
    PrivateRedis,
    bearer,
    create_project,
    create_token,
    eventually,
    proxy_token,
    require_redis,
)

pytestmark = pytest.mark.redis
Client = TestClient[Any, Any]


def no_basis(_: str) -> tuple[int, float] | None:
    return None


async def counted(redis: Redis, token_id: str) -> int:
    """The fleet's lifetime counter of a token (units granted, net of returns)."""
    return int(await redis.get(token_keys(token_id)[1]) or 0)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    await require_redis()
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@asynccontextmanager
async def limiter(
    url: str = REDIS_URL, basis: Callable[[str], Any] = no_basis, **options: Any
) -> AsyncIterator[FleetLimiter]:
    fleet = FleetLimiter(url, basis, **options)
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.close()


async def admit(fleet: FleetLimiter, token: str, limit: int, cap: int | None) -> bool:
    """One request's decision, as the stage makes it (False: refused or Redis down)."""
    lease = fleet.lease_for(token, limit, cap)
    if fleet.take(token, lease):
        return True
    if fleet.cached_refusal(lease) is not None:
        return False
    return await fleet.refill(token, lease)


async def test_two_limiters_share_a_lifetime_cap_exactly(redis: Redis) -> None:
    token = str(uuid.uuid4())
    async with limiter() as one, limiter() as two:
        decisions = await asyncio.gather(
            *(admit(fleet, token, 100_000, 50) for fleet in (one, two) * 100)
        )
        assert decisions.count(True) == 50
        granted = await counted(redis, token)
        assert granted == 50  # every unit granted was spent: none refused early
        assert sum(f.leases()[token].units for f in (one, two)) == 0


async def test_two_limiters_share_an_hourly_rate(redis: Redis) -> None:
    token = str(uuid.uuid4())
    async with limiter() as one, limiter() as two:
        decisions = await asyncio.gather(
            *(admit(fleet, token, 10, None) for fleet in (one, two) * 20)
        )
        assert decisions.count(True) == 10
        refusal = one.cached_refusal(one.leases()[token]) or two.cached_refusal(
            two.leases()[token]
        )
        assert refusal is not None and refusal.limit == "rate"
        assert 300 < refusal.retry_after_s(one.now()) <= 360  # one slot per 6 min


async def test_keys_share_one_hash_tag_and_all_expire(redis: Redis) -> None:
    token = str(uuid.uuid4())
    keys = token_keys(token)
    assert {key.split("}")[0] for key in keys} == {f"llm-proxy:{{t:{token}"}
    async with limiter(basis=lambda _: (0, 0.0)) as fleet:
        assert await admit(fleet, token, 100, 10)
        for key in keys:
            assert await redis.pttl(key) > 0, key
    assert len({key_slot(key.encode()) for key in keys}) == 1  # one Cluster slot


async def test_lifetime_counter_is_seeded_from_the_database_count(
    redis: Redis,
) -> None:
    token = str(uuid.uuid4())
    async with limiter(basis=lambda _: (47, 0.0)) as fleet:
        results = [await admit(fleet, token, 1000, 50) for _ in range(5)]
    assert results == [True, True, True, False, False]


async def test_close_gives_unused_units_back(redis: Redis) -> None:
    token = str(uuid.uuid4())
    async with limiter() as fleet:
        assert await admit(fleet, token, 1000, 100)
        held = fleet.leases()[token].units
        assert held > 0
        assert await counted(redis, token) == held + 1
    assert await counted(redis, token) == 1
    assert not await redis.zcard(token_keys(token)[2])


async def test_idle_units_go_back_to_the_fleet(redis: Redis) -> None:
    token = str(uuid.uuid4())
    async with limiter(idle_s=0.2) as fleet:
        assert await admit(fleet, token, 1000, 100)
        assert await counted(redis, token) > 1

        async def returned() -> bool:
            return await counted(redis, token) == 1

        await eventually(returned, 5)
        assert fleet.leases()[token].units == 0


async def test_near_the_limit_leases_shrink_to_one(redis: Redis) -> None:
    token = str(uuid.uuid4())
    async with limiter() as one, limiter() as two:
        for _ in range(6):
            assert await admit(one, token, 10_000, 12)
            assert await admit(two, token, 10_000, 12)
        assert not await admit(one, token, 10_000, 12)
        assert one.leases()[token].size == 1
        assert two.leases()[token].size == 1


async def test_changing_a_rate_limit_carries_counted_requests_over(
    redis: Redis,
) -> None:
    """As in process: counted requests carry over, capped at the new limit."""
    token = str(uuid.uuid4())
    async with limiter(lease_max=50) as fleet:
        assert await admit(fleet, token, 100, None)  # a lease of 20 of 100
        fleet.leases()[token].units = 0  # spent
        assert not await admit(fleet, token, 10, None)  # 20 counted > 10: none left
        assert fleet.leases()[token].refusal is not None
        assert await admit(fleet, token, 200, None)  # 10 counted: 190 left
        lease = fleet.leases()[token]
        assert lease.units + lease.room == 189


# -- the whole app in fleet mode --------------------------------------------------


@pytest.fixture
async def fleet_proxy(start_proxy: Callable[..., Any], redis: Redis) -> Client:
    client: Client = await start_proxy(REDIS_URL=REDIS_URL)
    return client


async def test_app_in_fleet_mode_caps_lifetime_requests_exactly(
    fleet_proxy: Client, fake: FakeUpstreamState
) -> None:
    project_id = (await create_project(fleet_proxy, "capped"))["project_id"]
    minted = await create_token(fleet_proxy, project_id, max_requests=50)
    token = minted["token"]
    responses = await asyncio.gather(
        *(fleet_proxy.get("/v1/models", headers=bearer(token)) for _ in range(200))
    )
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert fake.requests_seen == 50
    refused = next(r for r in responses if r.status == 429)
    assert (await refused.json())["error"]["code"] == "quota_exceeded"
    await fleet_proxy.app[TOKEN_SYNC_KEY].flush()
    stored = await fleet_proxy.get(f"/manage/tokens/{minted['token_id']}", headers=AUTH)
    assert (await stored.json())["request_count"] == 50  # = what was admitted


async def test_app_in_fleet_mode_rate_limits_with_retry_after_and_headers(
    fleet_proxy: Client,
) -> None:
    _, token = await proxy_token(fleet_proxy, rate_limit_per_hour=3)
    remaining = []
    for _ in range(3):
        ok = await fleet_proxy.get("/v1/models", headers=bearer(token))
        assert ok.status == 200
        remaining.append(ok.headers["x-ratelimit-remaining-requests"])
    assert remaining[-1] == "0"
    refused = await fleet_proxy.get("/v1/models", headers=bearer(token))
    body = await refused.json()
    assert refused.status == 429 and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 1200
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


async def test_app_in_fleet_mode_gives_back_units_of_calls_refused_later(
    start_proxy: Callable[..., Any], redis: Redis, fake: FakeUpstreamState
) -> None:
    """A call refused after the limit stage (here: too many in flight) spends nothing."""
    proxy: Client = await start_proxy(REDIS_URL=REDIS_URL, TOKEN_MAX_CONCURRENT="1")
    _, token = await proxy_token(proxy, max_requests=3)
    headers = {**bearer(token), "x-fake-behaviour": "stall-after-first-event"}
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    stream = await proxy.post("/v1/chat/completions", json=body, headers=headers)
    assert stream.status == 200
    busy = [await proxy.get("/v1/models", headers=bearer(token)) for _ in range(4)]
    assert {r.status for r in busy} == {429}
    assert (await busy[0].json())["error"]["code"] == "concurrency_limit_exceeded"
    fake.release()
    await stream.read()
    after = [await proxy.get("/v1/models", headers=bearer(token)) for _ in range(3)]
    assert [r.status for r in after] == [200, 200, 429]


# -- Redis away, and back ---------------------------------------------------------


async def ready_status(client: Client) -> dict[str, Any]:
    response = await client.get("/ready")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def metric(client: Client, name: str) -> float:
    text = await (await client.get("/metrics")).text()
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


async def test_redis_outage_falls_back_to_local_limits_then_resumes(
    start_proxy: Callable[..., Any],
    private_redis: PrivateRedis,
    fake: FakeUpstreamState,
) -> None:
    proxy: Client = await start_proxy(REDIS_URL=private_redis.url)
    fleet = proxy.app[FLEET_LIMITER_KEY]
    project_id, capped = await proxy_token(proxy, max_requests=30)
    minted = await create_token(proxy, project_id, max_requests=1000)
    token, token_id = minted["token"], minted["token_id"]
    assert (await ready_status(proxy))["status"] == "ready"
    for _ in range(5):
        assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200

    await private_redis.stop()
    statuses = []
    for _ in range(60):  # well past every unit the lease held
        statuses.append((await proxy.get("/v1/models", headers=bearer(token))).status)
    assert set(statuses) == {200}  # no 5xx: the local limits decide
    capped_statuses = [
        (await proxy.get("/v1/models", headers=bearer(capped))).status
        for _ in range(40)
    ]
    # the lifetime cap still holds in this process (the token table's own count)
    assert capped_statuses.count(200) == 30 and set(capped_statuses) == {200, 429}
    body = await ready_status(proxy)
    # the invalidation channel rides on the same Redis and is down with it
    assert body["status"] == "degraded"
    assert sorted(body["degraded"]) == ["redis", "token_invalidation"]
    assert await metric(proxy, "llm_proxy_fleet_limits_degraded") == 1
    assert await metric(proxy, "llm_proxy_fleet_fallback_decisions_total") > 0

    await private_redis.start()  # empty: a restart without persistence

    async def back() -> bool:  # the limiter and the invalidation channel reconnect
        return not fleet.down and (await ready_status(proxy))["status"] == "ready"

    await eventually(back, 15)
    assert await metric(proxy, "llm_proxy_fleet_limits_degraded") == 0
    # what the fallback admitted is charged to Redis once it is back
    redis = Redis.from_url(private_redis.url)
    try:

        async def charged_back() -> bool:
            return bool(await redis.exists(token_keys(token_id)[1]))

        await eventually(charged_back, 5)
        charged = await counted(redis, token_id)
        assert charged >= 60 - 20  # the units still held were spent before the debt
        # shared again: the fleet's counter decides (another process spent the rest)
        await redis.set(token_keys(token_id)[1], 1000)
        fleet.leases()[token_id].units = 0
        refused = await proxy.get("/v1/models", headers=bearer(token))
        assert refused.status == 429
        assert (await refused.json())["error"]["code"] == "quota_exceeded"
    finally:
        await redis.aclose()


async def test_redis_failure_mode_closed_refuses_with_503_in_openai_shape(
    start_proxy: Callable[..., Any],
) -> None:
    proxy: Client = await start_proxy(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_FAILURE_MODE="closed"
    )
    _, token = await proxy_token(proxy)
    refused = await proxy.get("/v1/models", headers=bearer(token))
    assert refused.status == 503
    error = (await refused.json())["error"]
    assert error["code"] == "rate_limiter_unavailable" and error["type"] == "api_error"
    assert refused.headers["Retry-After"] == "1"
    body = await ready_status(proxy)
    assert body["status"] == "degraded"
    assert "REDIS_FAILURE_MODE=closed" in body["checks"]["redis"]
    assert await metric(proxy, "llm_proxy_fleet_closed_refusals_total") == 1


async def test_a_dead_redis_never_holds_a_request_beyond_the_timeout(
    start_proxy: Callable[..., Any],
) -> None:
    """A Redis that accepts connections but never answers (a stalled server)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    stalled = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = stalled.sockets[0].getsockname()[1]
    try:
        proxy: Client = await start_proxy(
            REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_LIMITS_TIMEOUT="0.2"
        )
        _, token = await proxy_token(proxy)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await proxy.get("/v1/models", headers=bearer(token))
        assert response.status == 200
        assert loop.time() - started < 1.5
        await proxy.close()
    finally:
        for writer in held:
            writer.close()
        stalled.close()
        await stalled.wait_closed()


def test_lease_for_resets_what_it_knows_when_limits_change() -> None:
    fleet = FleetLimiter("redis://127.0.0.1:1/0", no_basis)
    lease = fleet.lease_for("t", 10, None)
    assert isinstance(lease, Lease) and lease.limit == 10
    lease.room = 0
    assert fleet.lease_for("t", 20, 5) is lease
    assert (lease.limit, lease.max_requests, lease.room) == (20, 5, 1)
