"""A real nginx in front of the proxy (deploy/nginx/test-template.conf), on loopback.

Proves that an SSE stream passes through nginx unbuffered and that the management and
health routes work through it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState, load_fixture

from ..support import AUTH, bearer

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy/nginx/test-template.conf"
NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
)

pytestmark = pytest.mark.nginx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


@pytest.fixture
async def proxy_server(
    aiohttp_server: AiohttpServer, proxy_env: dict[str, str]
) -> TestServer:
    """The proxy on a real loopback port (nginx needs a port, not a test client)."""
    return await aiohttp_server(create_app(Settings.from_env(proxy_env)))


@pytest.fixture
async def nginx(proxy_server: TestServer, tmp_path: Path) -> AsyncIterator[str]:
    """nginx rendered from the template, in the foreground; yields its base URL."""
    if NGINX is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is required in CI (apt-get install nginx)")
        pytest.skip("nginx is not installed (apt-get install nginx)")
    port = _free_port()
    config = (
        TEMPLATE.read_text()
        .replace("{{LISTEN_PORT}}", str(port))
        .replace("{{PROXY_PORT}}", str(proxy_server.port))
        .replace("{{PREFIX}}", str(tmp_path))
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(config)
    process = await asyncio.create_subprocess_exec(
        NGINX,
        "-e",
        str(tmp_path / "error.log"),
        "-p",
        str(tmp_path),
        "-c",
        str(conf),
        "-g",
        "daemon off;",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()


async def _token(session: aiohttp.ClientSession, base: str) -> str:
    body = {
        "name": "through-nginx",
        "openai_api_key": "sk-proj-NGINXTEST0123456789abcd",
    }
    async with session.post(
        f"{base}/manage/projects", json=body, headers=AUTH
    ) as response:
        assert response.status == 201, await response.text()
        project_id = (await response.json())["project_id"]
    body2: dict[str, Any] = {"project_id": project_id, "duration_minutes": 5}
    async with session.post(
        f"{base}/manage/tokens", json=body2, headers=AUTH
    ) as response:
        assert response.status == 201
        return str((await response.json())["token"])


async def test_nginx_passes_management_and_health_routes(nginx: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{nginx}/health") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ok"
        token = await _token(session, nginx)
        async with session.get(f"{nginx}/manage/tokens", headers=AUTH) as response:
            assert response.status == 200
            assert token not in await response.text()
        async with session.get(f"{nginx}/manage/tokens") as response:
            assert response.status == 401


async def test_nginx_streams_sse_without_buffering(
    nginx: str, fake: FakeUpstreamState
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await _token(session, nginx)
        headers = {**bearer(token), "x-fake-behaviour": "stall-after-first-event"}
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": False},
        }
        async with session.post(
            f"{nginx}/v1/chat/completions", json=body, headers=headers
        ) as response:
            assert response.status == 200
            async with asyncio.timeout(3):
                first = await response.content.readuntil(b"\n\n")
            assert first.startswith(b"data: {")
            assert fake.stalled == 1, "the upstream still holds the rest of the stream"
            fake.release()
            rest = await response.read()
    assert first + rest == load_fixture("chat_stream_no_usage.sse")
    # nginx acts on the proxy's X-Accel-Buffering itself and does not pass it on
    assert "X-Accel-Buffering" not in response.headers
    assert fake.requests[0].headers.get("X-Request-ID")
