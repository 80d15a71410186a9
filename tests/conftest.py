"""Shared fixtures: settings from an injected environment, the real app on a real port."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import (
    FAKE_STATE_KEY,
    FakeUpstreamState,
    create_fake_upstream,
)

from .support import MANAGEMENT_TOKEN

# tiktoken cannot download its encodings here: use the offline copy kept next to the
# repository (`../shared/tiktoken`) unless TIKTOKEN_CACHE_DIR is already set (CI).
_TIKTOKEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _TIKTOKEN_DIR.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_TIKTOKEN_DIR)


O200K_FILE = "fb374d419588a4632f3f557e76b4b70aebbca790"  # tiktoken's cache name


@pytest.fixture
def tiktoken_encodings() -> None:
    """Skip (fail on CI) when the offline tiktoken encodings are not available."""
    if _encodings_available():
        return
    reason = "tiktoken encodings not found: set TIKTOKEN_CACHE_DIR to their folder"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _encodings_available() -> bool:
    folder = os.environ.get("TIKTOKEN_CACHE_DIR")
    return bool(folder) and Path(folder, O200K_FILE).is_file()


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """The smallest environment a proxy starts with, on a throw-away SQLite file.

    Without the offline encodings, estimation is off: tiktoken would otherwise try to
    download them from the internet, which tests must never do.
    """
    return {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.db'}",
        "OPENAI_API_URL": "http://127.0.0.1:9",
        "LOG_LEVEL": "debug",
        "FILE_EVENT_LOG": str(tmp_path / "events.jsonl"),
        "DEAD_LETTER_DIR": str(tmp_path),
        "USAGE_ESTIMATION": "on" if _encodings_available() else "off",
    }


@pytest.fixture
def settings(base_env: dict[str, str]) -> Settings:
    return Settings.from_env(base_env)


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, settings: Settings
) -> TestClient[Any, Any]:
    """The whole app (cleanup contexts included) behind a real socket."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def make_client(
    aiohttp_client: AiohttpClient, base_env: dict[str, str]
) -> Callable[..., Any]:
    """Start the app with extra environment variables."""

    async def start(**env: str) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(Settings.from_env({**base_env, **env})))

    return start


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> TestServer:
    """The fake OpenAI upstream on a real loopback port."""
    return await aiohttp_server(create_fake_upstream())


@pytest.fixture
def fake(upstream: TestServer) -> FakeUpstreamState:
    """What the fake upstream received; its gate releases stalled answers."""
    return upstream.app[FAKE_STATE_KEY]


@pytest.fixture
def proxy_env(base_env: dict[str, str], upstream: TestServer) -> dict[str, str]:
    """Environment of a proxy in front of the fake upstream."""
    return {**base_env, "OPENAI_API_URL": str(upstream.make_url("")).rstrip("/")}


@pytest.fixture
def start_proxy(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> Callable[..., Any]:
    """Start a proxy in front of the fake upstream, with extra environment."""

    async def start(**env: str) -> TestClient[Any, Any]:
        settings = Settings.from_env({**proxy_env, **env})
        return await aiohttp_client(
            create_app(settings), server_kwargs={"handler_cancellation": True}
        )

    return start


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> TestClient[Any, Any]:
    """A proxy in front of the fake upstream, default settings."""
    client: TestClient[Any, Any] = await start_proxy()
    return client


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Commands under test configure the root logger; give the next test it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
