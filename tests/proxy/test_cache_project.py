"""A project's `cache_ttl_seconds`: the management API, its OpenAPI document, both
databases, and the token table that carries it to the proxy."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.keys import TOKEN_STORE_KEY, TOKEN_SYNC_KEY

from ..support import (
    AUTH,
    _postgres_schema,
    _postgres_url,
    create_project,
    create_token,
)

Client = TestClient[Any, Any]
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def manage(
    request: pytest.FixtureRequest,
    aiohttp_client: AiohttpClient,
    base_env: dict[str, str],
) -> AsyncIterator[Client]:
    """The whole app on SQLite or on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield await aiohttp_client(create_app(Settings.from_env(base_env)))
        return
    async with _postgres_schema() as schema:
        env = {
            **base_env,
            "DATABASE_URL": f"{_postgres_url()}?search_path={schema}",
            "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        }
        client = await aiohttp_client(create_app(Settings.from_env(env)))
        yield client
        await client.close()


async def test_the_setting_is_stored_changed_and_cleared(manage: Client) -> None:
    plain = await create_project(manage, "plain")
    assert plain["cache_ttl_seconds"] is None
    project = await create_project(manage, "cached", cache_ttl_seconds=300)
    assert project["cache_ttl_seconds"] == 300
    url = f"/manage/projects/{project['project_id']}"
    renamed = await manage.patch(url, json={"name": "still-cached"}, headers=AUTH)
    assert (await renamed.json())["cache_ttl_seconds"] == 300
    off = await manage.patch(url, json={"cache_ttl_seconds": 0}, headers=AUTH)
    assert (await off.json())["cache_ttl_seconds"] == 0
    cleared = await manage.patch(url, json={"cache_ttl_seconds": None}, headers=AUTH)
    assert (await cleared.json())["cache_ttl_seconds"] is None
    again = await manage.get(url, headers=AUTH)
    assert (await again.json())["cache_ttl_seconds"] is None
    listed = await manage.get("/manage/projects", headers=AUTH)
    assert {p["cache_ttl_seconds"] for p in await listed.json()} == {None}


@pytest.mark.parametrize("value", [-1, 31_536_001, "60", 1.5, True])
async def test_a_bad_value_is_refused_naming_the_field(
    client: Client, value: Any
) -> None:
    body = {
        "name": "bad",
        "openai_api_key": "sk-proj-0123456789",
        "cache_ttl_seconds": value,
    }
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "cache_ttl_seconds"
    project = await create_project(client, "good")
    url = f"/manage/projects/{project['project_id']}"
    patched = await client.patch(url, json={"cache_ttl_seconds": value}, headers=AUTH)
    assert patched.status == 400
    assert (await patched.json())["error"]["param"] == "cache_ttl_seconds"


async def test_the_openapi_document_describes_it(client: Client) -> None:
    document = await (await client.get("/manage/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for name in ("Project", "ProjectCreate", "ProjectUpdate", "ProjectUpdateWithId"):
        field = schemas[name]["properties"]["cache_ttl_seconds"]
        assert field["type"] == ["integer", "null"], name
        assert field["minimum"] == 0 and field["maximum"] == 31_536_000
        assert "RESPONSE_CACHE" in field["description"]


async def test_a_project_change_gives_its_tokens_a_new_generation(
    manage: Client,
) -> None:
    """The cache keys on the generation: every change of the project starts it afresh,
    and a process reading the project from the database computes the same one."""
    project = await create_project(manage, "generations", cache_ttl_seconds=60)
    token = (await create_token(manage, project["project_id"]))["token"]
    store, sync = manage.app[TOKEN_STORE_KEY], manage.app[TOKEN_SYNC_KEY]
    url = f"/manage/projects/{project['project_id']}"
    changes = [
        {"name": "generations-renamed"},
        {"cache_ttl_seconds": None},
        {"is_active": False},
        {"is_active": True},
        {"openai_api_key": "sk-proj-ROTATEDKEY0123456789abcdefgh"},
    ]
    seen = []
    for change in [{}, *changes]:
        if change:
            response = await manage.patch(url, json=change, headers=AUTH)
            assert response.status == 200
        if change.get("is_active") is False:
            continue  # its tokens are refused now
        principal = store.authenticate(token)
        await sync.resync()  # as another process loads it from the database
        assert (
            store.authenticate(token).project_generation == principal.project_generation
        )
        seen.append((principal.project_generation, principal.project_cache_ttl_s))
    generations = [generation for generation, _ in seen]
    assert len(set(generations)) == len(generations) == 5
    assert [ttl for _, ttl in seen] == [60, 60, None, None, None]
    assert all(len(g) == 32 and "ROTATED" not in g for g in generations)
