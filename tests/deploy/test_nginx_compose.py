"""deploy/nginx/compose.conf under a real nginx: `nginx -t`, then two stand-in replicas.

The compose network's names do not resolve here, so the copy under test swaps the
replicas' names and the published ports for loopback ones and points the TLS files
at a throw-away certificate. An nginx older than 1.27.3 (Debian's) does not know
`resolve` on upstream servers, which only re-resolves the names: the copy drops it
there and keeps everything else.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from ..e2e.test_nginx import _free_port, _wait_port
from .tools import ROOT, run, tool

CONF = ROOT / "deploy/nginx/compose.conf"
RESOLVE_SINCE = (1, 27, 3)

pytestmark = pytest.mark.nginx

# nginx's own files in the test's folder: it may not write its packaged ones.
TEMP_PATHS = "".join(
    f"{kind}_temp_path {{prefix}}/{kind}_temp; "
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
)
WRAPPER = (
    "user root; worker_processes 1; pid {prefix}/nginx.pid;\n"
    "error_log {prefix}/error.log info;\n"
    "events {{ worker_connections 64; }}\n"
    "http {{ access_log {prefix}/access.log; "
    + TEMP_PATHS
    + "include {prefix}/compose.conf; }}\n"
)


def _nginx_version(nginx: str) -> tuple[int, ...]:
    banner = run(nginx, "-v").stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", banner)
    assert found, banner
    return tuple(int(part) for part in found.groups())


def _certificate(prefix: Path) -> None:
    result = run(
        tool("openssl"),
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-subj", "/CN=localhost", "-keyout", str(prefix / "tls.key")),
        *("-out", str(prefix / "tls.crt")),
    )
    assert result.returncode == 0, result.stderr


def _render(
    nginx: str, prefix: Path, replicas: list[int], ports: tuple[int, int]
) -> Path:
    """The compose configuration with loopback names, ports and files; the wrapper."""
    text = CONF.read_text()
    for index, port in enumerate(replicas, 1):
        server = rf"^(\s*server )proxy-{index}:8080\b"
        text, swapped = re.subn(server, rf"\g<1>127.0.0.1:{port}", text, flags=re.M)
        assert swapped == 1
    text = text.replace("listen 80 ", f"listen 127.0.0.1:{ports[0]} ")
    text = text.replace("listen 443 ", f"listen 127.0.0.1:{ports[1]} ")
    text = text.replace("/etc/nginx/certs/", f"{prefix}/")
    if _nginx_version(nginx) < RESOLVE_SINCE:
        text = text.replace(" resolve ", " ")
    (prefix / "compose.conf").write_text(text)
    _certificate(prefix)
    wrapper = prefix / "nginx.conf"
    wrapper.write_text(WRAPPER.format(prefix=prefix))
    return wrapper


def _nginx_args(nginx: str, prefix: Path, conf: Path) -> list[str]:
    return [nginx, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)]


def test_nginx_accepts_the_compose_configuration(tmp_path: Path) -> None:
    nginx = tool("nginx")
    conf = _render(nginx, tmp_path, [_free_port(), _free_port()], (80, 443))
    result = run(*_nginx_args(nginx, tmp_path, conf), "-t")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def _replica(name: str, release: asyncio.Event) -> web.Application:
    """A stand-in replica: says who it is; /v1/stream sends one event, then waits."""

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"replica": name})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/live", live)
    app.router.add_post("/v1/stream", stream)
    return app


@pytest.fixture
async def front(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> AsyncIterator[tuple[str, str, asyncio.Event]]:
    """nginx with the compose configuration before two replicas: its URLs, a release."""
    nginx = tool("nginx")
    release = asyncio.Event()
    replicas: list[TestServer] = [
        await aiohttp_server(_replica(name, release)) for name in ("one", "two")
    ]
    ports = (_free_port(), _free_port())
    conf = _render(nginx, tmp_path, [int(r.port or 0) for r in replicas], ports)
    process = await asyncio.create_subprocess_exec(
        *_nginx_args(nginx, tmp_path, conf),
        "-g",
        "daemon off;",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _wait_port(ports[1])
        yield f"http://127.0.0.1:{ports[0]}", f"https://127.0.0.1:{ports[1]}", release
    finally:
        release.set()
        process.terminate()
        await process.wait()


async def test_nginx_spreads_calls_over_both_replicas_and_streams_unbuffered(
    front: tuple[str, str, asyncio.Event],
) -> None:
    plain, tls, release = front
    connector = aiohttp.TCPConnector(ssl=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        seen = set()
        for _ in range(6):
            async with session.get(f"{tls}/live") as response:
                assert response.status == 200
                seen.add((await response.json())["replica"])
        assert seen == {"one", "two"}
        async with session.get(f"{tls}/metrics") as response:
            assert response.status == 404, "each replica's own: not through nginx"
        async with session.get(f"{plain}/live", allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Location"].startswith("https://")
        async with asyncio.timeout(3):
            response = await session.post(f"{tls}/v1/stream", data=b"{}")
            first = await response.content.readuntil(b"\n\n")
        async with response:
            assert first == b"data: first\n\n", "the replica still holds the rest"
            release.set()
            assert await response.read() == b"data: [DONE]\n\n"
