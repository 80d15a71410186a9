"""CORS and the response cache: a stored answer keeps no caller's CORS headers, and a
hit gets those of its own caller."""

from __future__ import annotations

from typing import Any

import pytest

from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import proxy_token
from . import test_cache
from .test_cache import HIT, get_twice

pytestmark = pytest.mark.redis

# The cache tests' Redis and proxy fixtures.
redis = test_cache.redis
start_cached = test_cache.start_cached

FIRST, SECOND = "https://first.example", "https://second.example"


async def test_a_hit_carries_the_cors_headers_of_its_own_caller(
    start_cached: Any, fake: FakeUpstreamState
) -> None:
    proxy = await start_cached(CORS_ALLOWED_ORIGINS=f"{FIRST},{SECOND}")
    _, token = await proxy_token(proxy)
    stored, _ = await get_twice(proxy, token, Origin=FIRST)
    assert stored.headers["Access-Control-Allow-Origin"] == FIRST
    _, hit = await get_twice(proxy, token, Origin=SECOND)
    assert HIT.fullmatch(hit.headers["Cache-Status"])
    assert hit.headers.getall("Access-Control-Allow-Origin") == [SECOND]
    assert hit.headers.getall("Vary").count("Origin") == 1
    _, plain = await get_twice(proxy, token)
    assert HIT.fullmatch(plain.headers["Cache-Status"])
    assert "Access-Control-Allow-Origin" not in plain.headers
    assert fake.requests_seen == 1
