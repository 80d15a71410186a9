"""The response cache's settings: off by default, and every mistake named at start."""

from __future__ import annotations

import pytest

from llm_proxy.config import ConfigError, Settings

from ..support import MANAGEMENT_TOKEN

BASE = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
REDIS = "redis://127.0.0.1:6379/0"


def test_the_cache_is_off_unless_asked_for() -> None:
    assert Settings.from_env(BASE).response_cache is None
    assert Settings.from_env({**BASE, "REDIS_URL": REDIS}).response_cache is None
    off = {**BASE, "REDIS_URL": REDIS, "RESPONSE_CACHE": "off"}
    assert Settings.from_env(off).response_cache is None


def test_on_it_uses_redis_url_and_its_defaults() -> None:
    cache = Settings.from_env(
        {**BASE, "REDIS_URL": REDIS, "RESPONSE_CACHE": "on"}
    ).response_cache
    assert cache is not None
    assert cache.redis_url == REDIS
    assert cache.ttl_max_s == 3600
    assert cache.max_bytes == 256 * 1024
    assert cache.timeout_s == 0.1


def test_its_own_redis_and_bounds_can_be_set() -> None:
    own = "redis://cache.internal:6379/3"
    cache = Settings.from_env(
        {
            **BASE,
            "RESPONSE_CACHE": "true",
            "RESPONSE_CACHE_REDIS_URL": own,
            "RESPONSE_CACHE_TTL_MAX": "60",
            "RESPONSE_CACHE_MAX_BYTES": "1048576",
            "RESPONSE_CACHE_TIMEOUT": "0.5",
        }
    ).response_cache
    assert cache is not None
    assert (cache.redis_url, cache.ttl_max_s, cache.max_bytes) == (own, 60, 1 << 20)
    assert cache.timeout_s == 0.5


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RESPONSE_CACHE": "on"}, "REDIS_URL"),
        ({"RESPONSE_CACHE": "maybe", "REDIS_URL": REDIS}, "RESPONSE_CACHE"),
        (
            {"RESPONSE_CACHE": "on", "RESPONSE_CACHE_REDIS_URL": "http://x"},
            "RESPONSE_CACHE_REDIS_URL",
        ),
        (
            {"RESPONSE_CACHE": "on", "REDIS_URL": REDIS, "RESPONSE_CACHE_TTL_MAX": "0"},
            "RESPONSE_CACHE_TTL_MAX",
        ),
        (
            {
                "RESPONSE_CACHE": "on",
                "REDIS_URL": REDIS,
                "RESPONSE_CACHE_MAX_BYTES": "1048577",
            },
            "RESPONSE_CACHE_MAX_BYTES",
        ),
        (
            {"RESPONSE_CACHE": "on", "REDIS_URL": REDIS, "RESPONSE_CACHE_TIMEOUT": "0"},
            "RESPONSE_CACHE_TIMEOUT",
        ),
    ],
)
def test_mistakes_fail_at_start_naming_the_setting(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({**BASE, **env})
