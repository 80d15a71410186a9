"""The in-memory token table against a real repository shared by two app instances."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.keys import TOKEN_STORE_KEY, TOKEN_SYNC_KEY

from .support import AUTH, bearer, proxy_token

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
