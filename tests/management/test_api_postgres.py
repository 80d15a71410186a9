"""The management API and the proxy on the real PostgreSQL server, hostile input included."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings

from ..support import AUTH, UPSTREAM_KEY, bearer, create_project, create_token

pytestmark = pytest.mark.postgres
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema for one test, dropped afterwards."""
    try:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL unreachable (set TEST_POSTGRES_URL): {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must not skip PostgreSQL tests")
        pytest.skip(reason)
    schema = f"test_manage_{uuid.uuid4().hex[:12]}"
    await connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await connection.close()


@pytest.fixture
async def pg_client(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str], pg_schema: str
) -> AsyncIterator[TestClient[Any, Any]]:
    """The whole app on PostgreSQL (search_path selects the test's schema).

    Closed here, before the schema is dropped, so its shutdown flush finds its tables.
    """
    env = {
        **proxy_env,
        "DATABASE_URL": f"{POSTGRES_URL}?search_path={pg_schema}",
        "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    client = await aiohttp_client(create_app(Settings.from_env(env)))
    yield client
    await client.close()


async def test_postgres_walk_through_create_use_revoke(
    pg_client: TestClient[Any, Any],
) -> None:
    project = await create_project(pg_client, "pg-demo", metadata={"team": "ml"})
    token = await create_token(pg_client, project["project_id"], max_requests=3)
    models = await pg_client.get("/v1/models", headers=bearer(token["token"]))
    assert models.status == 200
    listed = await pg_client.get("/manage/tokens", headers=AUTH)
    assert token["token"] not in await listed.text()
    revoke = await pg_client.delete(f"/manage/tokens/{token['token_id']}", headers=AUTH)
    assert revoke.status == 204
    refused = await pg_client.get("/v1/models", headers=bearer(token["token"]))
    assert refused.status == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/manage/projects/not-a-uuid", None, 404),
        ("GET", "/manage/projects/%00", None, 404),
        ("GET", "/manage/tokens/not-a-uuid", None, 404),
        ("GET", "/manage/tokens?project_id=nope", None, 200),
        ("GET", "/manage/projects?search=%00", None, 400),
        ("POST", "/manage/tokens", {"project_id": "zzz", "duration_minutes": 5}, 404),
        (
            "POST",
            "/manage/projects",
            {"name": "a\u0000", "openai_api_key": UPSTREAM_KEY},
            400,
        ),
        ("DELETE", "/manage/tokens/zzz", None, 404),
        ("DELETE", "/manage/projects/zzz", None, 404),
        ("POST", "/manage/projects/zzz/tokens/revoke", None, 404),
        ("PATCH", "/manage/projects/zzz", {"name": "x"}, 404),
    ],
)
async def test_postgres_hostile_ids_and_text_get_4xx_not_500(
    pg_client: TestClient[Any, Any],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    response = await pg_client.request(method, path, json=body, headers=AUTH)
    assert response.status == status, await response.text()
