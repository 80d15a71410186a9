"""An allowlist file's `base_url` chooses the upstream unless OPENAI_API_URL is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import bearer, proxy_token

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _allowlist(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "apis.yaml"
    path.write_text(
        f"apis:\n  local:\n    base_url: {base_url}\n"
        "    allowed_methods: [GET, POST]\n"
        "    allowed_endpoints: [/v1/chat/completions, /v1/models]\n"
    )
    return path


async def test_allowlist_base_url_is_the_upstream_when_openai_api_url_is_unset(
    aiohttp_client: AiohttpClient,
    base_env: dict[str, str],
    upstream: TestServer,
    fake: FakeUpstreamState,
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in base_env.items() if k != "OPENAI_API_URL"}
    url = str(upstream.make_url("")).rstrip("/")
    env["API_CONFIG_PATH"] = str(_allowlist(tmp_path, url))
    settings = Settings.from_env(env)
    proxy: Any = await aiohttp_client(create_app(settings))
    _, token = await proxy_token(proxy)
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT, headers=bearer(token)
    )
    assert response.status == 200, await response.text()
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


async def test_openai_api_url_wins_over_the_allowlist_base_url(
    aiohttp_client: AiohttpClient,
    proxy_env: dict[str, str],
    fake: FakeUpstreamState,
    tmp_path: Path,
) -> None:
    # The file names an address where nothing listens; the environment's wins.
    env = {
        **proxy_env,
        "API_CONFIG_PATH": str(_allowlist(tmp_path, "http://127.0.0.1:9")),
    }
    proxy: Any = await aiohttp_client(create_app(Settings.from_env(env)))
    _, token = await proxy_token(proxy)
    response = await proxy.get("/v1/models", headers=bearer(token))
    assert response.status == 200, await response.text()
    assert [r.path for r in fake.requests] == ["/v1/models"]
