"""The in-memory token table against a real repository shared by two app instances."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.auth.sync import TokenSync
from llm_proxy.config import Settings
from llm_proxy.keys import TOKEN_STORE_KEY, TOKEN_SYNC_KEY
from llm_proxy.storage import SqliteRepository

from ..support import AUTH, bearer, proxy_token

Client = TestClient[Any, Any]


async def _two_processes(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> tuple[Client, Client]:
    """Two app instances on one SQLite file, like two workers of one deployment."""
    settings = Settings.from_env(proxy_env)
    first = await aiohttp_client(create_app(settings))
    second = await aiohttp_client(create_app(settings))
    return first, second


async def test_other_process_sees_new_and_revoked_tokens_after_reload(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, second = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first)
    assert (await second.get("/v1/models", headers=bearer(token))).status == 401
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 200
    await first.delete("/manage/tokens", json={"token": token}, headers=AUTH)
    assert (await first.get("/v1/models", headers=bearer(token))).status == 401
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 401


async def test_other_process_sees_deactivated_project_and_rotated_key(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str], fake: Any
) -> None:
    first, second = await _two_processes(aiohttp_client, proxy_env)
    project_id, token = await proxy_token(first)
    rotated = "sk-proj-ROTATEDELSEWHERE0123456789"
    await first.patch(
        f"/manage/projects/{project_id}", json={"openai_api_key": rotated}, headers=AUTH
    )
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 200
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {rotated}"
    await first.patch(
        f"/manage/projects/{project_id}", json={"is_active": False}, headers=AUTH
    )
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 403


async def test_used_quota_is_stored_and_respected_after_a_restart(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, second = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first, max_requests=3)
    for _ in range(2):
        assert (await first.get("/v1/models", headers=bearer(token))).status == 200
    assert await first.app[TOKEN_SYNC_KEY].flush() == 2
    listed = await first.get("/manage/tokens", headers=AUTH)
    [item] = await listed.json()
    assert item["request_count"] == 2 and item["last_used_at"] is not None
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 200
    refused = await second.get("/v1/models", headers=bearer(token))
    assert refused.status == 429
    assert (await refused.json())["error"]["code"] == "quota_exceeded"


async def test_a_failed_usage_write_is_retried_by_the_next_flush(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, _ = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first, max_requests=5)
    await first.get("/v1/models", headers=bearer(token))
    store = first.app[TOKEN_STORE_KEY]
    batch = store.take_usage()
    assert [usage.requests for usage in batch] == [1]
    store.usage_failed(batch)  # as after a database error
    assert await first.app[TOKEN_SYNC_KEY].flush() == 1
    listed = await (await first.get("/manage/tokens", headers=AUTH)).json()
    assert listed[0]["request_count"] == 1


async def test_a_call_refused_after_a_flush_never_shows_in_request_count(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    """The flush runs while a call is still sending its body; the call is then refused
    for its model: the database never counted it, not even for one flush."""
    first, _ = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first, allowed_models=["gpt-4o-mini"])
    sent_head = asyncio.Event()
    finish = asyncio.Event()

    async def upload() -> Any:
        yield b'{"messages": [{"role": "user", "content": "hi"}], '
        sent_head.set()
        await finish.wait()
        yield b'"model": "gpt-4o"}'

    headers = {**bearer(token), "Content-Type": "application/json"}
    call = asyncio.create_task(
        first.post("/v1/chat/completions", data=upload(), headers=headers)
    )
    await sent_head.wait()
    await asyncio.sleep(0.05)  # the proxy admitted it and waits for the model
    assert await first.app[TOKEN_SYNC_KEY].flush() == 0
    assert _sql(proxy_env, "SELECT request_count FROM tokens") == [(0,)]
    finish.set()
    response = await call
    assert response.status == 403
    await first.app[TOKEN_SYNC_KEY].flush()
    assert _sql(proxy_env, "SELECT request_count FROM tokens") == [(0,)]
    assert (await first.get("/v1/models", headers=bearer(token))).status == 200
    assert await first.app[TOKEN_SYNC_KEY].flush() == 1


def _sql(proxy_env: dict[str, str], statement: str, *params: Any) -> list[Any]:
    """Run one statement on the test database file, as another writer would."""
    path = proxy_env["DATABASE_URL"].removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(statement, params).fetchall()


async def _error(client: Client, token: str) -> tuple[int, str]:
    response = await client.get("/v1/models", headers=bearer(token))
    return response.status, (await response.json())["error"]["code"]


async def test_an_expired_token_keeps_its_code_across_reloads_and_restarts(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, _ = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    _sql(proxy_env, "UPDATE tokens SET expires_at = ?", past.replace("+00:00", "Z"))
    sync = first.app[TOKEN_SYNC_KEY]
    await sync.reload()  # sees the changed row
    assert await _error(first, token) == (401, "token_expired")
    await sync.resync()  # a full one keeps it too
    assert await _error(first, token) == (401, "token_expired")
    late = await aiohttp_client(create_app(Settings.from_env(proxy_env)))
    assert await _error(late, token) == (401, "token_expired")  # a fresh start


async def test_a_spent_quota_promises_no_retry(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, _ = await _two_processes(aiohttp_client, proxy_env)
    _, token = await proxy_token(first, max_requests=1)
    assert (await first.get("/v1/models", headers=bearer(token))).status == 200
    refused = await first.get("/v1/models", headers=bearer(token))
    assert refused.status == 429
    assert "Retry-After" not in refused.headers
    error = (await refused.json())["error"]
    assert (error["code"], error["type"]) == ("quota_exceeded", "insufficient_quota")


async def test_counts_of_tokens_revoked_before_the_flush_are_written(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, _ = await _two_processes(aiohttp_client, proxy_env)
    project_id, token = await proxy_token(first)
    other_project_id, other = await proxy_token(first)
    for value in (token, token, token, other):
        assert (await first.get("/v1/models", headers=bearer(value))).status == 200
    await first.delete("/manage/tokens", json={"token": token}, headers=AUTH)
    revoke_all = f"/manage/projects/{other_project_id}/tokens/revoke"
    assert (await first.post(revoke_all, headers=AUTH)).status == 200
    assert await first.app[TOKEN_SYNC_KEY].flush() == 4
    counts = dict(_sql(proxy_env, "SELECT project_id, request_count FROM tokens"))
    assert counts == {project_id: 3, other_project_id: 1}


async def test_a_project_deleted_elsewhere_is_dropped_by_the_next_reload(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, second = await _two_processes(aiohttp_client, proxy_env)
    project_id, token = await proxy_token(first)
    _, kept = await proxy_token(first)
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 200
    assert (await first.delete(f"/manage/projects/{project_id}", headers=AUTH)).ok
    await second.app[TOKEN_SYNC_KEY].reload()  # the tombstones say so
    assert await _error(second, token) == (401, "invalid_api_key")
    assert (await second.get("/v1/models", headers=bearer(kept))).status == 200


async def test_a_full_resync_drops_what_was_deleted_without_a_tombstone(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    first, second = await _two_processes(aiohttp_client, proxy_env)
    project_id, token = await proxy_token(first)
    _, kept = await proxy_token(first)
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await first.delete(f"/manage/projects/{project_id}", headers=AUTH)).ok
    _sql(proxy_env, "DELETE FROM deletions")  # as if purged while this one slept
    await second.app[TOKEN_SYNC_KEY].reload()
    assert (await second.get("/v1/models", headers=bearer(token))).status == 200
    await second.app[TOKEN_SYNC_KEY].resync()  # the hourly safety net
    assert await _error(second, token) == (401, "invalid_api_key")
    assert (await second.get("/v1/models", headers=bearer(kept))).status == 200


class _HeldWrites(SqliteRepository):
    """A real SQLite repository whose usage writes wait for `release` (set `held`),
    after committing or, with `before_commit`, before writing anything."""

    def __init__(self, path: str, *, before_commit: bool = False) -> None:
        super().__init__(path)
        self.before_commit = before_commit
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def record_token_usage(self, usage: Any) -> None:
        if not self.before_commit:
            await super().record_token_usage(usage)
        self.held.set()
        await self.release.wait()
        if self.before_commit:
            await super().record_token_usage(usage)


async def _held_sync(
    aiohttp_client: AiohttpClient,
    proxy_env: dict[str, str],
    *,
    before_commit: bool = False,
    **token: Any,
) -> tuple[Client, _HeldWrites, TokenSync, str]:
    """An app whose token sync writes usage through `_HeldWrites`."""
    client = await aiohttp_client(create_app(Settings.from_env(proxy_env)))
    _, value = await proxy_token(client, **token)
    path = proxy_env["DATABASE_URL"].removeprefix("sqlite:///")
    held = _HeldWrites(path, before_commit=before_commit)
    await held.connect()
    sync = TokenSync(
        client.app[TOKEN_STORE_KEY],
        held,
        reload_interval_s=3600,
        flush_interval_s=0.01,
    )
    await sync.reload()
    return client, held, sync, value


async def test_a_reload_during_a_flush_does_not_count_requests_twice(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    client, held, sync, token = await _held_sync(
        aiohttp_client, proxy_env, max_requests=3
    )
    try:
        for _ in range(2):
            assert (await client.get("/v1/models", headers=bearer(token))).status == 200
        flushing = asyncio.create_task(sync.flush())
        await held.held.wait()  # committed, not yet known to the store
        reloading = asyncio.create_task(sync.reload())  # reads request_count = 2
        await asyncio.sleep(0.05)
        held.release.set()
        assert await flushing == 2
        await reloading
        assert (await client.get("/v1/models", headers=bearer(token))).status == 200
        assert await _error(client, token) == (429, "quota_exceeded")
    finally:
        await held.close()


async def test_closing_lets_a_flush_in_progress_finish(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> None:
    client, held, sync, token = await _held_sync(
        aiohttp_client, proxy_env, before_commit=True
    )
    try:
        await sync.start()
        assert (await client.get("/v1/models", headers=bearer(token))).status == 200
        await held.held.wait()  # the background flush has taken the count
        closing_sync = asyncio.create_task(sync.close())
        await asyncio.sleep(0.05)
        held.release.set()
        await closing_sync
        [(count,)] = _sql(proxy_env, "SELECT request_count FROM tokens")
        assert count == 1
    finally:
        await held.close()
