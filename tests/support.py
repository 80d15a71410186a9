"""Helpers and fakes shared by the test modules: constants, management API shortcuts,
a fake clock, the admin app, throw-away PostgreSQL schemas, Redis checks, a private
redis-server."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings

MANAGEMENT_TOKEN = "test-management-token-0123456789"
AUTH = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
UPSTREAM_KEY = "sk-proj-UPSTREAMSECRETKEY0123456789abcd"


async def create_project(
    client: TestClient[Any, Any], name: str = "demo", **fields: Any
) -> dict[str, Any]:
    """POST /manage/projects and return the JSON answer."""
    body = {"name": name, "openai_api_key": UPSTREAM_KEY, **fields}
    response = await client.post("/manage/projects", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    data: dict[str, Any] = await response.json()
    return data


async def create_token(
    client: TestClient[Any, Any], project_id: str, **fields: Any
) -> dict[str, Any]:
    """POST /manage/tokens and return the JSON answer (with the token value)."""
    body = {"project_id": project_id, "duration_minutes": 60, **fields}
    response = await client.post("/manage/tokens", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    data: dict[str, Any] = await response.json()
    return data


async def proxy_token(client: TestClient[Any, Any], **fields: Any) -> tuple[str, str]:
    """A fresh project and a token for it: (project_id, token value)."""
    project = await create_project(client, f"project-{uuid.uuid4().hex[:8]}")
    project_id: str = project["project_id"]
    token = await create_token(client, project_id, **fields)
    return project_id, token["token"]


async def open_stalled_stream(client: TestClient[Any, Any]) -> ClientResponse:
    """A streamed chat call whose fake upstream holds the rest after its first event.

    Release the rest with the fake upstream's `release()` (or its `gate`).
    """
    _, token = await proxy_token(client)
    headers = {**bearer(token), "x-fake-behaviour": "stall-after-first-event"}
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    return await client.post("/v1/chat/completions", json=body, headers=headers)


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a proxied call."""
    return {"Authorization": f"Bearer {token}"}


REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def require_redis(url: str = REDIS_URL) -> None:
    """Skip when Redis does not answer; with CI=true that is a failure instead."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        reason = f"Redis is not reachable at {url} ({exc}); start redis-server"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        await client.aclose()


async def read_events(
    path: Path, count: int, timeout_s: float = 5
) -> list[dict[str, Any]]:
    """The lines of a JSONL event log, once there are at least `count`."""
    async with asyncio.timeout(timeout_s):
        while True:
            lines = path.read_bytes().splitlines() if path.exists() else []
            if len(lines) >= count:
                return [orjson.loads(line) for line in lines]
            await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Wait until `check()` is true; fail the test after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - a condition, not an event
            await asyncio.sleep(0.05)


class FakeClock:
    """A clock (monotonic or wall) that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ADMIN_USER = "operator"
ADMIN_PASSWORD = "correct-horse-battery"
ADMIN_ENV = {"ADMIN_USER": ADMIN_USER, "ADMIN_PASSWORD": ADMIN_PASSWORD}
ADMIN_AUTH = {"Authorization": aiohttp.encode_basic_auth(ADMIN_USER, ADMIN_PASSWORD)}


def with_admin(settings: Settings) -> web.Application:
    """The whole app, checking that `create_app` mounted /admin exactly when enabled."""
    app = create_app(settings)
    mounted = any(r.canonical == "/admin" for r in app.router.resources())
    assert mounted is settings.admin_enabled, "create_app must mount /admin iff enabled"
    return app


DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_url() -> str:
    return os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


async def _postgres_admin() -> Any:
    """A direct connection to the test server; skip (fail in CI) when unreachable."""
    try:
        return await asyncpg.connect(_postgres_url(), timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL unreachable (set TEST_POSTGRES_URL): {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must not skip PostgreSQL tests")
        pytest.skip(reason)


@asynccontextmanager
async def _postgres_schema() -> AsyncIterator[str]:
    """A freshly created schema, dropped with everything in it afterwards."""
    admin = await _postgres_admin()
    schema = f"test_{uuid.uuid4().hex}"  # generated identifier, not a value
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


class PrivateRedis:
    """A redis-server of the test's own on a free port, which a test may stop and
    start again (on the same port); never the shared server other tests use."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        from llm_proxy.server import free_port

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        # persistent: an append-only file synced on every write, as a production
        # Redis keeps the event stream; otherwise a restart comes back empty
        self._persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not persistent:
            self._persistence = ["--appendonly", "no"]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it answers PING (skip when redis-server is missing)."""
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed")
        self._process = await asyncio.create_subprocess_exec(
            *[binary, "--port", str(self.port), "--bind", "127.0.0.1"],
            *["--save", "", *self._persistence, "--dir", str(self._workdir)],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        from redis.asyncio import Redis

        client = Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except Exception:
                        await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Stop it (SIGTERM) and wait until it is gone."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
