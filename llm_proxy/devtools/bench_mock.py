"""`llm-proxy bench --mock`: the fake upstream and the proxy as child processes.

Both run on loopback ports (`python -m llm_proxy fake-upstream` and `python -m
llm_proxy serve`, a throw-away SQLite database, a generated management token), and a
token is minted through the management API. Running them in the bench's own process
would share one event loop (and one core) with the load generator, so the client's own
work would be counted as proxy latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..management.client import ManageClient
from ..server import free_port, tail, wait_until_healthy
from .bench import BenchError

CHILD_START_TIMEOUT_S: Final = 20.0
CHILD_STOP_TIMEOUT_S: Final = 10.0

# Every variable `Settings` reads: a mock proxy must not inherit the caller's setup.
PROXY_ENV_NAMES: Final = frozenset(
    {
        "ADMIN_PASSWORD",
        "ADMIN_USER",
        "API_CONFIG_PATH",
        "BREAKER_COOLDOWN",
        "BREAKER_FAILURE_THRESHOLD",
        "DATABASE_POOL_SIZE",
        "DATABASE_URL",
        "DEFAULT_RATE_LIMIT_PER_HOUR",
        "ENCRYPTION_KEY",
        "FILE_EVENT_LOG",
        "FORWARD_CLIENT_IP",
        "LISTEN_ADDR",
        "LLM_PROXY_EVENT_BUS",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "MANAGEMENT_TOKEN",
        "MAX_REQUEST_BYTES",
        "METRICS_TOKEN",
        "OPENAI_API_URL",
        "REDIS_URL",
        "SHUTDOWN_GRACE_PERIOD",
        "TOKEN_REFRESH_INTERVAL",
        "UPSTREAM_CONNECT_TIMEOUT",
        "UPSTREAM_MAX_CONNECTIONS",
        "UPSTREAM_READ_TIMEOUT",
        "UPSTREAM_RETRIES",
        "USAGE_FLUSH_INTERVAL",
    }
)


@dataclass(frozen=True, slots=True)
class MockTargets:
    """Where the mock proxy and fake upstream listen, and a token for the proxy."""

    proxy_url: str
    upstream_url: str
    token: str


@contextlib.asynccontextmanager
async def mock_targets() -> AsyncIterator[MockTargets]:
    """Start the fake upstream and a proxy on loopback; stop both on exit."""
    with tempfile.TemporaryDirectory(prefix="llm-proxy-bench-") as tmp:
        workdir = Path(tmp)
        children: list[asyncio.subprocess.Process] = []
        try:
            upstream_url = await _start_child(
                children, workdir, "fake-upstream", ["fake-upstream"], None
            )
            management_token = secrets.token_urlsafe(32)
            proxy_url = await _start_child(
                children,
                workdir,
                "proxy",
                ["serve"],
                _proxy_env(workdir, upstream_url, management_token),
            )
            token = await _mint_token(proxy_url, management_token)
            yield MockTargets(proxy_url, upstream_url, token)
        finally:
            await _stop_children(children)


def _proxy_env(
    workdir: Path, upstream_url: str, management_token: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_NAMES}
    env.update(
        {
            "MANAGEMENT_TOKEN": management_token,
            "DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
            "OPENAI_API_URL": upstream_url,
            "LOG_LEVEL": "warning",
            "SHUTDOWN_GRACE_PERIOD": "5",
        }
    )
    return env


async def _start_child(
    children: list[asyncio.subprocess.Process],
    workdir: Path,
    name: str,
    command: list[str],
    env: dict[str, str] | None,
) -> str:
    port = free_port()
    if command[0] == "fake-upstream":
        args = [*command, "--host", "127.0.0.1", "--port", str(port)]
    else:
        args = command
        env = {**(env or {}), "LISTEN_ADDR": f"127.0.0.1:{port}"}
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llm_proxy",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    children.append(process)
    url = f"http://127.0.0.1:{port}"
    if name == "proxy":
        healthy = await wait_until_healthy(
            url, CHILD_START_TIMEOUT_S, lambda: process.returncode is None
        )
    else:
        healthy = await _wait_listening(port, process)
    if not healthy:  # pragma: no cover - a broken installation
        raise BenchError(f"the mock {name} did not start: {tail(log_path)}")
    return url


async def _wait_listening(port: int, process: asyncio.subprocess.Process) -> bool:
    """Until `port` accepts a connection; False if the child died or time ran out."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while time.monotonic() < deadline and process.returncode is None:
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return True
        await asyncio.sleep(0.05)  # pragma: no cover - a slow child start
    return False  # pragma: no cover - a child that never listens


async def _mint_token(proxy_url: str, management_token: str) -> str:
    async with ManageClient(proxy_url, management_token) as api:
        project = await api.create_project(
            name="bench", api_key="sk-bench-" + secrets.token_hex(16)
        )
        token = await api.create_token(
            project_id=project["project_id"],
            duration_minutes=24 * 60,
            rate_limit_per_hour=2**31 - 1,
        )
    return str(token["token"])


async def _stop_children(children: list[asyncio.subprocess.Process]) -> None:
    for process in reversed(children):
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), CHILD_STOP_TIMEOUT_S)
            except TimeoutError:  # pragma: no cover - a child that ignores SIGTERM
                process.kill()
                await process.wait()
