"""The reload loop's pokes (coalescing) and the Redis invalidation channel, in process.

Redis is real: the shared server for the channel itself, a private redis-server for
the outages (stopped, paused), so no other test's Redis is ever disturbed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.invalidation import TokenInvalidation
from llm_proxy.auth.sync import TokenSync
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.server import free_port
from llm_proxy.storage import SqliteRepository

from ..support import AUTH, REDIS_URL, PrivateRedis, bearer, proxy_token, require_redis

MASTER_KEY = bytes(range(32))


class CountingSync(TokenSync):
    """A TokenSync whose reload only counts, and waits while `gate` is closed."""

    def __init__(self, tmp_path: Path, reload_interval_s: float = 3600) -> None:
        store = TokenStore(TokenHasher(MASTER_KEY), KeyCipher(MASTER_KEY))
        repository = SqliteRepository(tmp_path / "unused.db")  # never touched
        super().__init__(
            store,
            repository,
            reload_interval_s=reload_interval_s,
            flush_interval_s=3600,
        )
        self.runs = 0
        self.running = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def reload(self) -> None:
        self.runs += 1
        self.running.set()
        try:
            await self.gate.wait()
        finally:
            self.running.clear()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


# -- coalescing in TokenSync -------------------------------------------------------


async def test_a_poke_reloads_at_once_not_at_the_interval(tmp_path: Path) -> None:
    sync = CountingSync(tmp_path)
    await sync.start()
    assert sync.runs == 1  # the warm reload
    sync.poke()
    await until(lambda: sync.runs == 2, timeout_s=1)
    await asyncio.sleep(0.05)
    assert sync.runs == 2  # one poke, one reload
    await sync.close()


async def test_pokes_during_a_reload_queue_exactly_one_more(tmp_path: Path) -> None:
    sync = CountingSync(tmp_path)
    await sync.start()
    sync.gate.clear()
    sync.poke()
    await until(sync.running.is_set)
    assert sync.runs == 2
    for _ in range(100):  # a burst of messages while the reload is in flight
        sync.poke()
    sync.gate.set()
    await until(lambda: sync.runs == 3)
    await asyncio.sleep(0.1)
    assert sync.runs == 3  # the queued one; the other 99 pokes added nothing
    await sync.close()


async def test_a_poke_before_start_is_covered_by_the_warm_reload(
    tmp_path: Path,
) -> None:
    sync = CountingSync(tmp_path)
    sync.poke()  # e.g. the subscriber connected first
    await sync.start()
    await asyncio.sleep(0.05)
    assert sync.runs == 1
    await sync.close()


async def test_close_cancels_a_poked_reload_in_flight(tmp_path: Path) -> None:
    sync = CountingSync(tmp_path)
    await sync.start()
    sync.gate.clear()
    sync.poke()
    await until(sync.running.is_set)
    async with asyncio.timeout(2):
        await sync.close()
    assert not sync.running.is_set()


async def test_without_pokes_the_periodic_reload_still_runs(tmp_path: Path) -> None:
    sync = CountingSync(tmp_path, reload_interval_s=0.02)
    await sync.start()
    await until(lambda: sync.runs >= 4)
    await sync.close()


async def test_a_poke_after_a_failed_reload_still_reloads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class FailingOnce(CountingSync):
        async def reload(self) -> None:
            await super().reload()
            if self.runs == 2:
                raise OSError("database gone for a moment")

    sync = FailingOnce(tmp_path)
    await sync.start()
    sync.poke()
    await until(lambda: sync.runs == 2)
    sync.poke()
    await until(lambda: sync.runs == 3)
    assert "background token sync failed" in caplog.text
    await sync.close()


# -- the channel on a real Redis ---------------------------------------------------


class Pokes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
async def channel() -> str:
    await require_redis()
    return f"test-invalidation-{uuid.uuid4().hex}"


@pytest.fixture
async def pair(channel: str) -> AsyncIterator[tuple[TokenInvalidation, Pokes, Pokes]]:
    """Two processes' channels (A publishes, B listens), both subscribed."""
    a_pokes, b_pokes = Pokes(), Pokes()
    a = TokenInvalidation(REDIS_URL, a_pokes, channel=channel)
    b = TokenInvalidation(REDIS_URL, b_pokes, channel=channel)
    await a.start()
    await a.start()  # idempotent
    await b.start()
    async with asyncio.timeout(5):
        await a.wait_subscribed()
        await b.wait_subscribed()
    yield a, a_pokes, b_pokes
    await a.close()
    await b.close()
    assert not b.subscribed


@pytest.mark.redis
async def test_a_message_pokes_the_other_process_not_the_sender(
    pair: tuple[TokenInvalidation, Pokes, Pokes],
) -> None:
    a, a_pokes, b_pokes = pair
    assert (a_pokes.count, b_pokes.count) == (1, 1)  # the catch-up on subscribe
    assert await a.ready_check() == "ok"
    await a.publish("token", "t-1")
    await until(lambda: b_pokes.count == 2)
    await asyncio.sleep(0.05)
    assert a_pokes.count == 1  # it applied its own change already
    stats = a.stats()
    assert (stats.subscribed, stats.published, stats.publish_failures) == (True, 1, 0)


@pytest.mark.redis
async def test_an_unreadable_message_is_still_a_poke(
    pair: tuple[TokenInvalidation, Pokes, Pokes],
) -> None:
    a, a_pokes, b_pokes = pair
    client = Redis.from_url(REDIS_URL)
    try:
        await client.publish(a.channel, b"\xff not json")
        await client.publish(a.channel, b"[1, 2]")
    finally:
        await client.aclose()
    await until(lambda: a_pokes.count == 3 and b_pokes.count == 3)
    assert a.stats().received == 2


async def test_redis_unreachable_degrades_logs_once_and_never_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.auth.invalidation")
    pokes = Pokes()
    channel = TokenInvalidation(
        f"redis://127.0.0.1:{free_port()}/0",
        pokes,
        backoff_first_s=0.01,
        backoff_max_s=0.02,
    )
    assert await channel.ready_check() == (
        "degraded: token invalidation channel not subscribed yet"
    )
    await channel.publish("token", "before-start")  # no client yet: nothing to do
    await channel.start()
    await asyncio.sleep(0.3)  # many reconnection attempts
    state = await channel.ready_check()
    assert state.startswith("degraded: token invalidation channel (Redis pub/sub) down")
    async with asyncio.timeout(1):
        await channel.publish("token", "t-1")
        await channel.publish("token", "t-2")  # skipped: it failed just now
    assert channel.stats().publish_failures == 1
    await channel.close()
    down = [r for r in caplog.records if "channel (Redis pub/sub) down" in r.message]
    assert len(down) == 1
    cannot = [r for r in caplog.records if "cannot publish" in r.message]
    assert len(cannot) == 1
    assert pokes.count == 0


@pytest.mark.redis
async def test_redis_restarted_resubscribes_and_catches_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.auth.invalidation")
    redis = PrivateRedis(tmp_path)
    await redis.start()
    pokes = Pokes()
    channel = TokenInvalidation(
        redis.url, pokes, backoff_first_s=0.02, backoff_max_s=0.1
    )
    try:
        await channel.start()
        async with asyncio.timeout(5):
            await channel.wait_subscribed()
        await channel.publish("token", "t-1")
        await redis.stop()
        await until(lambda: not channel.subscribed)
        await channel.publish("token", "t-2")  # fails, logged once
        await redis.start()
        async with asyncio.timeout(5):
            await channel.wait_subscribed()
        assert pokes.count == 2  # on the first subscribe, and on the resubscribe
        await channel.publish("token", "t-3")  # the publisher reconnects too
        stats = channel.stats()
        assert (stats.published, stats.publish_failures, stats.reconnects) == (2, 1, 1)
        assert "channel back after" in caplog.text
        assert "publishing token invalidations to Redis again" in caplog.text
    finally:
        await channel.close()
        await redis.stop()


@pytest.mark.redis
async def test_a_redis_that_stops_answering_counts_as_down(tmp_path: Path) -> None:
    """CLIENT PAUSE: the connection stays open but nothing answers, not even PING."""
    redis = PrivateRedis(tmp_path)
    await redis.start()
    pokes = Pokes()
    channel = TokenInvalidation(
        redis.url,
        pokes,
        backoff_first_s=0.02,
        backoff_max_s=0.1,
        heartbeat_s=0.05,
        dead_after_s=0.2,
    )
    admin = Redis.from_url(redis.url)
    try:
        await channel.start()
        async with asyncio.timeout(5):
            await channel.wait_subscribed()
        await asyncio.sleep(0.2)  # a few heartbeats answered
        assert channel.subscribed
        await admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        await until(lambda: not channel.subscribed, timeout_s=3)
        async with asyncio.timeout(5):
            await channel.wait_subscribed()  # back once the pause ends
        assert channel.stats().reconnects == 1
        assert pokes.count == 2
    finally:
        await admin.aclose()
        await channel.close()
        await redis.stop()


# -- wired into the app --------------------------------------------------------------


async def ready_checks(client: Any) -> dict[str, str]:
    response = await client.get("/ready")
    checks: dict[str, str] = (await response.json())["checks"]
    return checks


@pytest.mark.redis
async def test_two_apps_on_one_database_and_redis_apply_each_others_changes(
    start_proxy: Callable[..., Any],
) -> None:
    """Revocation, deactivation and a new token, through one app, seen by the other
    long before its periodic reload (an hour here)."""
    await require_redis()
    a = await start_proxy(REDIS_URL=REDIS_URL, TOKEN_REFRESH_INTERVAL="3600")
    b = await start_proxy(REDIS_URL=REDIS_URL, TOKEN_REFRESH_INTERVAL="3600")
    for client in (a, b):
        async with asyncio.timeout(5):
            while True:
                if (await ready_checks(client)).get("token_invalidation") == "ok":
                    break
                await asyncio.sleep(0.01)

    async def b_status(token: str) -> int:
        response = await b.get("/v1/models", headers=bearer(token))
        await response.read()
        return response.status

    async def until_b(token: str, status: int) -> None:
        async with asyncio.timeout(2):
            while True:
                if await b_status(token) == status:
                    return
                await asyncio.sleep(0.005)

    project_id, token = await proxy_token(a)
    await until_b(token, 200)  # creation pokes too
    lookup = await a.post("/manage/tokens/lookup", json={"token": token}, headers=AUTH)
    token_id = (await lookup.json())["token_id"]
    assert (await a.delete(f"/manage/tokens/{token_id}", headers=AUTH)).status == 204
    await until_b(token, 401)

    other_project, other = await proxy_token(a)
    await until_b(other, 200)
    patched = await a.patch(
        f"/manage/projects/{other_project}", json={"is_active": False}, headers=AUTH
    )
    assert patched.status == 200
    await until_b(other, 403)

    metrics = await (await b.get("/metrics")).text()
    assert "llm_proxy_token_invalidation_subscribed 1.0" in metrics
    assert (
        'llm_proxy_token_invalidation_messages_total{direction="received"}' in metrics
    )
    assert project_id != other_project


async def test_without_redis_there_is_no_invalidation_channel(
    start_proxy: Callable[..., Any],
) -> None:
    client = await start_proxy()
    assert "token_invalidation" not in await ready_checks(client)
    assert "token_invalidation" not in await (await client.get("/metrics")).text()
