"""Issue #14's limits on two real `serve` processes on one PostgreSQL and one Redis.

`max_requests=50` gives exactly 50 successes over 200 concurrent requests spread
across both processes, and a `rate_limit_per_hour` holds across both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from llm_proxy.proxy.fleet_limits import token_keys

from ..support import REDIS_URL
from .fleet import Fleet, burst, fleet_session, mint, request_count, running_fleet

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("fleet")) as started:
        yield started


async def test_max_requests_is_exact_over_200_concurrent_calls_on_two_processes(
    fleet: Fleet,
) -> None:
    async with fleet_session() as session:
        token = await mint(session, fleet, max_requests=50)
        results = await burst(session, fleet, token["token"], per_process=100)
        statuses = Counter(status for _, status, _ in results)
        by_process = Counter(index for index, status, _ in results if status == 200)
        print(
            f"\nmax_requests=50 over 200 calls: {dict(statuses)}, admitted per"
            f" process {dict(by_process)}"
        )
        assert statuses == {200: 50, 429: 150}
        assert {code for _, status, code in results if status == 429} == {
            "quota_exceeded"
        }
        # request_count in the database is what was admitted, no more, no less
        assert await request_count(session, fleet, token["token_id"], 50) == 50
    redis = Redis.from_url(REDIS_URL)
    try:  # every unit granted was spent: no call was refused while budget remained
        assert int(await redis.get(token_keys(token["token_id"])[1]) or 0) == 50
    finally:
        await redis.aclose()


async def test_rate_limit_per_hour_holds_across_two_processes(fleet: Fleet) -> None:
    async with fleet_session() as session:
        token = await mint(session, fleet, rate_limit_per_hour=20)
        results = await burst(session, fleet, token["token"], per_process=40)
        statuses = Counter(status for _, status, _ in results)
        print(f"\nrate_limit_per_hour=20 over 80 calls: {dict(statuses)}")
        assert statuses == {200: 20, 429: 60}
        assert {code for _, status, code in results if status == 429} == {
            "rate_limit_exceeded"
        }
        # and a later call on either process is still refused: one shared window
        for base in fleet.bases:
            headers = {"Authorization": f"Bearer {token['token']}"}
            async with session.get(f"{base}/v1/models", headers=headers) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) > 1
