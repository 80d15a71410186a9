"""Fleet limits at steady state: no Redis round trip on a call whose token has budget.

Counted on real Redis servers: the round trips of sequential calls (INFO commandstats
of a private `redis-server`), the waits of bursts larger than a lease, and the units a
refill hands to the requests that waited for it before anyone else can take them.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from llm_proxy.keys import FLEET_LIMITER_KEY
from llm_proxy.proxy.fleet_limits import FleetLimiter
from llm_proxy.proxy.leases import LEASE_FLOOR

from ..support import REDIS_URL, PrivateRedis, bearer, proxy_token, require_redis
from .test_fleet_limits import admit, counted, limiter, metric

pytestmark = pytest.mark.redis
Client = TestClient[Any, Any]
HUGE = 10**9  # an hourly rate no test comes near


async def lease_scripts_run(url: str) -> int:
    """EVALSHA calls the Redis server at `url` has answered so far."""
    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_sequential_calls_make_one_round_trip_per_lease_and_never_wait(
    private_redis: PrivateRedis, start_proxy: Callable[..., Any]
) -> None:
    proxy: Client = await start_proxy(REDIS_URL=private_redis.url)
    fleet: FleetLimiter = proxy.app[FLEET_LIMITER_KEY]
    _, token = await proxy_token(proxy)
    before = await lease_scripts_run(private_redis.url)
    calls = 200
    for _ in range(calls):
        response = await proxy.get("/v1/models", headers=bearer(token))
        assert response.status == 200
    round_trips = await lease_scripts_run(private_redis.url) - before
    # the first lease, then one per LEASE_FLOOR calls (each asked at half spent)
    assert 1 <= round_trips <= math.ceil(calls / LEASE_FLOOR) + 1
    # only the first call found the lease empty; every later refill landed ahead
    assert fleet.stats.waits == 1
    assert await metric(proxy, "llm_proxy_fleet_lease_waits_total") == 1


async def burst(fleet: FleetLimiter, token: str, calls: int) -> None:
    """`calls` requests in one loop turn, as busy connections deliver them."""
    admitted = await asyncio.gather(
        *(admit(fleet, token, HUGE, None) for _ in range(calls))
    )
    assert all(admitted)
    await asyncio.sleep(0.05)  # the upstream's answers, then the next turn


async def test_a_lease_grows_past_a_burst_so_later_bursts_never_wait() -> None:
    await require_redis()
    token, calls = str(uuid.uuid4()), 64
    async with limiter() as fleet:
        for _ in range(3):  # the first bursts find the lease too small and grow it
            await burst(fleet, token, calls)
        waits, refills = fleet.stats.waits, fleet.stats.lease_calls
        for _ in range(20):
            await burst(fleet, token, calls)
        assert fleet.stats.waits == waits  # every call spent a unit already held
        assert fleet.stats.lease_calls - refills <= 20 * calls // LEASE_FLOOR
        assert fleet.leases()[token].size >= 2 * calls


async def test_units_of_a_refill_go_to_the_requests_waiting_for_it() -> None:
    """Newcomers between the reply and the waiters' turn cannot take their units."""
    await require_redis()
    token, waiting = str(uuid.uuid4()), 30
    async with limiter() as fleet:
        lease = fleet.lease_for(token, HUGE, None)
        waiters = [
            asyncio.ensure_future(admit(fleet, token, HUGE, None))
            for _ in range(waiting)
        ]
        await asyncio.sleep(0)  # every waiter awaits the one refill now
        pending = lease.refill
        assert pending is not None and lease.waiting == waiting
        newcomers: list[bool] = []

        def newcomers_arrive(_: object) -> None:  # before any waiter runs again
            newcomers.extend(fleet.take(token, lease) for _ in range(100))

        pending.add_done_callback(newcomers_arrive)
        assert all(await asyncio.gather(*waiters))
        assert len(newcomers) == 100 and not any(newcomers)
        assert fleet.stats.waits == waiting


async def test_close_while_a_refill_flies_leaves_no_unit_unreturned() -> None:
    """The waiters spend a whole grant, which would ask for the next lease at once;
    a graceful stop begun meanwhile returns every unit nobody spent."""
    await require_redis()
    token, waiting = str(uuid.uuid4()), 30
    client = Redis.from_url(REDIS_URL)
    fleet = FleetLimiter(REDIS_URL, lambda _: None)
    await fleet.start()
    try:
        waiters = [
            asyncio.ensure_future(admit(fleet, token, HUGE, 1000))
            for _ in range(waiting)
        ]
        await asyncio.sleep(0)  # every waiter awaits the one refill now
        await fleet.close()
        assert all(await asyncio.gather(*waiters))
        assert await counted(client, token) == waiting
    finally:
        await client.aclose()
