"""Shared fixtures: settings from an injected environment, the real app on a real port."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings

from .support import MANAGEMENT_TOKEN


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """The smallest environment a proxy starts with, on a throw-away SQLite file."""
    return {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.db'}",
        "OPENAI_API_URL": "http://127.0.0.1:9",
        "LOG_LEVEL": "debug",
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
