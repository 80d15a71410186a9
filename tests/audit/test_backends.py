"""The audit trail on the production backends: PostgreSQL for the table, and Redis
for the audit bus (its own stream, next to the events' stream, which never carries
an audit record)."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ..management.test_api_postgres import POSTGRES_URL, pg_schema
from ..support import REDIS_URL, require_redis
from .support import actions, assert_no_secret, audit_env, audit_page
from .test_api import SCRIPT_ACTIONS, run_script

__all__ = ["pg_schema"]  # a fixture used below

Client = TestClient[Any, Any]


@pytest.mark.postgres
async def test_the_trail_is_recorded_and_read_back_on_postgresql(
    start_proxy: Callable[..., Any], pg_schema: str, tmp_path: Path
) -> None:
    client: Client = await start_proxy(
        **audit_env(tmp_path),
        DATABASE_URL=f"{POSTGRES_URL}?search_path={pg_schema}",
        ENCRYPTION_KEY=base64.b64encode(os.urandom(32)).decode(),
    )
    made = await run_script(client)
    page = await audit_page(client, len(SCRIPT_ACTIONS))
    assert actions(page) == SCRIPT_ACTIONS
    revokes = await audit_page(client, 2, action="token.revoke")
    assert len(revokes["events"]) == 2
    values = [token["token"] for token in made["tokens"]]
    assert_no_secret(orjson.dumps(page).decode(), *values)
    await client.close()  # before the schema is dropped: the writers drain into it


@pytest.fixture
async def stream_key() -> AsyncIterator[str]:
    """A stream key of this test's own on the shared Redis, deleted afterwards."""
    await require_redis()
    key = f"test-audit-{uuid.uuid4().hex[:12]}"
    yield key
    redis = Redis.from_url(REDIS_URL)
    await redis.delete(key, f"{key}:audit")
    await redis.aclose()


@pytest.mark.redis
async def test_the_audit_bus_on_redis_is_a_stream_of_its_own(
    start_proxy: Callable[..., Any], stream_key: str, tmp_path: Path
) -> None:
    client: Client = await start_proxy(
        **audit_env(tmp_path),
        LLM_PROXY_EVENT_BUS="redis",
        REDIS_URL=REDIS_URL,
        EVENT_STREAM_KEY=stream_key,
        EVENT_SPOOL_PATH=str(tmp_path / "spool.jsonl"),
    )
    await run_script(client)
    page = await audit_page(client, len(SCRIPT_ACTIONS))
    assert actions(page) == SCRIPT_ACTIONS
    redis = Redis.from_url(REDIS_URL)
    try:
        entries = await redis.xrange(f"{stream_key}:audit")
        kinds = {orjson.loads(fields[b"data"])["type"] for _, fields in entries}
        assert kinds == {"audit"} and len(entries) == len(SCRIPT_ACTIONS)
        assert await redis.xlen(stream_key) == 0  # no proxied call, no audit record
        groups = {g["name"] for g in await redis.xinfo_groups(f"{stream_key}:audit")}
        assert groups == {b"audit", b"audit-file"}
    finally:
        await redis.aclose()
