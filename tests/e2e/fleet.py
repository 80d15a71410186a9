"""Two real `python -m llm_proxy serve` processes on one PostgreSQL and one Redis.

The fake upstream is a third process on loopback; the database is a fresh schema of
the test server, dropped afterwards. Shared by the fleet tests of this folder.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from llm_proxy.devtools.bench_mock import PROXY_ENV_NAMES
from llm_proxy.server import free_port

from ..support import (
    AUTH,
    MANAGEMENT_TOKEN,
    REDIS_URL,
    UPSTREAM_KEY,
    _postgres_url,
    require_redis,
)

COMMAND = [sys.executable, "-m", "llm_proxy"]


@dataclass
class Fleet:
    """Two proxies (`bases`) in front of one fake upstream."""

    bases: tuple[str, str]
    logs: tuple[Path, Path]
    proxies: tuple[subprocess.Popen[bytes], ...]
    schema: str


def environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_NAMES}
    env.update(extra)
    return env


def wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{base} exited at start:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{base} did not become healthy:\n{log.read_text()[-2000:]}")


async def create_schema(schema: str, drop: bool = False) -> None:
    try:
        connection = await asyncpg.connect(_postgres_url(), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if drop:
            return
        reason = f"PostgreSQL unreachable (set TEST_POSTGRES_URL): {exc!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        verb = "DROP SCHEMA IF EXISTS" if drop else "CREATE SCHEMA"
        await connection.execute(f'{verb} "{schema}"' + (" CASCADE" if drop else ""))
    finally:
        await connection.close()


@contextmanager
def running_fleet(workdir: Path, **extra: str) -> Iterator[Fleet]:
    """Two proxies on a fresh schema, stopped (SIGTERM) and the schema dropped on exit."""
    asyncio.run(require_redis())
    schema = f"test_{uuid.uuid4().hex}"  # generated identifier, not a value
    asyncio.run(create_schema(schema))
    upstream_port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            subprocess.Popen(
                [*COMMAND, "fake-upstream", "--port", str(upstream_port)],
                env=environ(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        shared = {
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "OPENAI_API_URL": f"http://127.0.0.1:{upstream_port}",
            "DATABASE_URL": f"{_postgres_url()}?search_path={schema}",
            "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
            "REDIS_URL": REDIS_URL,
            "TOKEN_REFRESH_INTERVAL": "0.1",
            "USAGE_FLUSH_INTERVAL": "0.2",
            "FILE_EVENT_LOG": "off",
            "LOG_FORMAT": "text",
            "USAGE_ESTIMATION": "off",
            **extra,
        }
        bases, logs = [], []
        for name in ("a", "b"):  # one after the other: the first one migrates
            port = free_port()
            log = workdir / f"{name}.log"
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [*COMMAND, "serve"],
                    cwd=workdir,
                    env=environ(**shared, LISTEN_ADDR=f"127.0.0.1:{port}"),
                    stdout=out,
                    stderr=out,
                )
            processes.append(process)
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, process, log)
            bases.append(base)
            logs.append(log)
        proxies = tuple(processes[1:])
        yield Fleet((bases[0], bases[1]), (logs[0], logs[1]), proxies, schema)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung shutdown
                process.kill()
                process.wait()
        asyncio.run(create_schema(schema, drop=True))


async def mint(
    session: aiohttp.ClientSession, fleet: Fleet, **limits: Any
) -> dict[str, Any]:
    """A token minted through the first process, once the second one knows it too."""
    base = fleet.bases[0]
    project = {"name": f"fleet-{uuid.uuid4().hex[:8]}", "openai_api_key": UPSTREAM_KEY}
    async with session.post(f"{base}/manage/projects", json=project, headers=AUTH) as r:
        project_id = (await r.json())["project_id"]
    body = {"project_id": project_id, "duration_minutes": 10, **limits}
    async with session.post(f"{base}/manage/tokens", json=body, headers=AUTH) as r:
        token: dict[str, Any] = await r.json()
    # A probe minted after it: once the second process admits the probe, its
    # reload has seen the token too (changes are applied in order).
    probe_body = {"project_id": project_id, "duration_minutes": 10}
    async with session.post(
        f"{base}/manage/tokens", json=probe_body, headers=AUTH
    ) as r:
        probe = (await r.json())["token"]
    headers = {"Authorization": f"Bearer {probe}"}
    async with asyncio.timeout(10):
        while True:
            async with session.get(f"{fleet.bases[1]}/v1/models", headers=headers) as r:
                if r.status == 200:
                    return token
            await asyncio.sleep(0.05)


async def burst(
    session: aiohttp.ClientSession, fleet: Fleet, token: str, per_process: int
) -> list[tuple[int, int, str | None]]:
    """`per_process` concurrent calls on each process: (process, status, error code)."""
    headers = {"Authorization": f"Bearer {token}"}

    async def one(index: int) -> tuple[int, int, str | None]:
        async with session.get(f"{fleet.bases[index]}/v1/models", headers=headers) as r:
            code = None if r.status == 200 else (await r.json())["error"]["code"]
            return index, r.status, code

    calls = [one(i % 2) for i in range(2 * per_process)]
    return await asyncio.gather(*calls)


async def request_count(
    session: aiohttp.ClientSession, fleet: Fleet, token_id: str, expected: int
) -> int:
    """The token's request_count in the database, once both processes flushed."""
    url = f"{fleet.bases[1]}/manage/tokens/{token_id}"
    count = -1
    async with asyncio.timeout(10):
        while count != expected:
            async with session.get(url, headers=AUTH) as r:
                count = (await r.json())["request_count"]
            assert count <= expected, "request_count over what was admitted"
            await asyncio.sleep(0.1)
    return count


def fleet_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
