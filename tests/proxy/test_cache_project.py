"""A project's `cache_ttl_seconds`: the management API, its OpenAPI document, both
databases, and the token table that carries it to the proxy."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.config import Settings
from llm_proxy.storage import (
    Project,
    ProjectChanges,
    Repository,
    SqliteRepository,
    Token,
)

from ..support import (
    AUTH,
    _postgres_schema,
    _postgres_url,
    create_project,
)

Client = TestClient[Any, Any]
NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
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
    tmp_path: Path,
) -> None:
    """The cache keys on the generation: every change of the project starts it afresh."""
    key = os.urandom(32)
    hasher, cipher = TokenHasher(key), KeyCipher(key)
    project = Project(
        id="p1",
        name="p",
        description="",
        metadata={},
        encrypted_api_key=cipher.encrypt("sk-proj-0123456789"),
        api_key_hint="sk-...6789",
        is_active=True,
        created_at=NOW,
        updated_at=NOW,
        cache_ttl_seconds=60,
    )
    repository: Repository = SqliteRepository(tmp_path / "gen.db")
    await repository.connect()
    try:
        await repository.migrate()
        await repository.create_project(project)
        stored = await repository.get_project("p1")
        changed = await repository.update_project(
            "p1",
            ProjectChanges(clear_cache_ttl_seconds=True),
            now=NOW + timedelta(seconds=1),
        )
    finally:
        await repository.close()
    assert stored is not None and stored.cache_ttl_seconds == 60
    assert changed is not None and changed.cache_ttl_seconds is None
    store = TokenStore(hasher, cipher)
    store.put_token(token_of(hasher.hash("wt-value"), "p1"))
    seen = []
    for version in (project, stored, changed):
        store.put_project(version)
        principal = store.authenticate("wt-value")
        seen.append((principal.project_generation, principal.project_cache_ttl_s))
    assert seen[0] == seen[1] and seen[0][1] == 60
    assert seen[2][0] != seen[0][0] and seen[2][1] is None
    assert all(len(g) == 32 for g, _ in seen)


def token_of(token_hash: str, project_id: str) -> Token:
    return Token(
        id="t1",
        token_hash=token_hash,
        token_hint="alue",
        project_id=project_id,
        expires_at=NOW + timedelta(days=3650),
        is_active=True,
        request_count=0,
        max_requests=None,
        rate_limit_per_hour=None,
        created_at=NOW,
        last_used_at=None,
    )
