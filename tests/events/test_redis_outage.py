"""Redis stopped under load and started again: nothing fails, nothing is lost.

Issue #14, acceptance 2, on one proxy whose limits, invalidation channel and event
bus all ride on a private redis-server: while it is down no call gets a 5xx, the
limits fall back to the process's own and `/ready` says degraded; once it is back
(with its append-only file, as a production Redis keeps the stream) the shared limits
and the invalidation channel resume, and every event reaches the event log: those
in the stream before the stop and those spooled meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.keys import FLEET_LIMITER_KEY

from ..support import PrivateRedis, bearer, eventually, proxy_token

pytestmark = pytest.mark.redis
LOADERS = 4


async def _event_ids(log: Path) -> set[str]:
    return {orjson.loads(line)["event_id"] for line in log.read_bytes().splitlines()}


async def _ready(proxy: TestClient[Any, Any]) -> str:
    response = await proxy.get("/ready")
    body: dict[str, Any] = await response.json()
    return str(body["status"])


async def test_redis_stopped_under_load_then_back_loses_and_fails_nothing(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    redis = PrivateRedis(tmp_path, persistent=True)
    await redis.start()
    try:
        proxy: TestClient[Any, Any] = await start_proxy(
            REDIS_URL=redis.url,
            LLM_PROXY_EVENT_BUS="redis",
            EVENT_SPOOL_PATH=str(tmp_path / "spool.jsonl"),
        )
        _, token = await proxy_token(proxy, max_requests=100_000)
        limiter = proxy.app[FLEET_LIMITER_KEY]
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                async with proxy.get("/v1/models", headers=bearer(token)) as r:
                    await r.read()
                    statuses[r.status] += 1

        loaders = [asyncio.create_task(load()) for _ in range(LOADERS)]
        await asyncio.sleep(0.5)
        await redis.stop()

        async def degraded() -> bool:
            return await _ready(proxy) == "degraded"

        await eventually(degraded, 10)
        during = statuses[200]
        await asyncio.sleep(1.0)  # calls go on, decided by the local limits
        assert statuses[200] > during
        await redis.start()

        async def ready() -> bool:
            return await _ready(proxy) == "ready"

        await eventually(ready, 15)  # the limiter and the invalidation channel
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*loaders)
        served = statuses[200]
        print(f"\nRedis stopped and started under load: {dict(statuses)}")
        assert set(statuses) == {200}  # no 5xx, no refusal: the budget was never spent
        assert not limiter.down
        started = time.monotonic()
        log = tmp_path / "events.jsonl"

        async def all_there() -> bool:
            return len(await _event_ids(log)) >= served

        await eventually(all_there, 60)
        print(f"events in the log {time.monotonic() - started:.2f} s later")
        # at least once: a batch written while its XACK failed comes again
        assert len(await _event_ids(log)) == served
    finally:
        await redis.stop()
