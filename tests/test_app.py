"""`create_app` itself: which sub-apps it mounts for which settings."""

from __future__ import annotations

from pathlib import Path

from llm_proxy.app import create_app
from llm_proxy.config import Settings

from .support import MANAGEMENT_TOKEN

ADMIN_ENV = {"ADMIN_USER": "operator", "ADMIN_PASSWORD": "correct-horse-battery"}


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'proxy.db'}",
            **env,
        }
    )


def _prefixes(settings: Settings) -> set[str]:
    app = create_app(settings)
    return {resource.canonical for resource in app.router.resources()}


def test_create_app_mounts_the_admin_pages_when_credentials_are_set(
    tmp_path: Path,
) -> None:
    assert "/admin" in _prefixes(_settings(tmp_path, **ADMIN_ENV))


def test_create_app_leaves_the_admin_pages_out_without_credentials(
    tmp_path: Path,
) -> None:
    prefixes = _prefixes(_settings(tmp_path))
    assert "/admin" not in prefixes
    assert {"/manage", "/health", "/metrics"} <= prefixes
