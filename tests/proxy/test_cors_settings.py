"""CORS_ALLOWED_ORIGINS and CORS_MAX_AGE: parsed once at start, refused naming the
setting."""

from __future__ import annotations

import pytest

from llm_proxy.config import ConfigError, Settings
from llm_proxy.origins import MAX_ORIGINS

from ..support import MANAGEMENT_TOKEN


def settings(**env: str) -> Settings:
    return Settings.from_env({"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, **env})


def test_no_origin_is_allowed_server_wide_by_default() -> None:
    assert settings().cors.allowed_origins == ()
    assert settings().cors.max_age_s == 600


def test_the_server_wide_origins_are_a_comma_separated_list() -> None:
    given = (
        " https://App.example.com:443, http://localhost:5173 ,,https://*.example.org"
    )
    cors = settings(CORS_ALLOWED_ORIGINS=given, CORS_MAX_AGE="30").cors
    assert cors.allowed_origins == (
        "https://app.example.com",
        "http://localhost:5173",
        "https://*.example.org",
    )
    assert cors.max_age_s == 30


@pytest.mark.parametrize(
    "given",
    ["*", "https://app.example.com/", "app.example.com", "https://*.com", "null"],
)
def test_a_bad_server_wide_origin_stops_the_start_naming_the_setting(
    given: str,
) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        settings(CORS_ALLOWED_ORIGINS=f"https://ok.example,{given}")


def test_the_server_wide_origins_are_bounded() -> None:
    many = ",".join(f"https://h{n}.example" for n in range(MAX_ORIGINS + 1))
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS.*at most"):
        settings(CORS_ALLOWED_ORIGINS=many)


@pytest.mark.parametrize("given", ["-1", "86401", "ten"])
def test_a_bad_preflight_cache_time_stops_the_start(given: str) -> None:
    with pytest.raises(ConfigError, match="CORS_MAX_AGE"):
        settings(CORS_MAX_AGE=given)
