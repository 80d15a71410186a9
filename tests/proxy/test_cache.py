"""The response cache in the whole app: the real Redis, the fake upstream, real sockets.

Each test makes its own projects, so their entries (under `llm-proxy:cache:<project>:`)
never meet another test's on the shared Redis.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import RESPONSE_CACHE_KEY
from llm_proxy.proxy.cache import (
    RETRY_AFTER_S,
    ResponseCache,
    decode_entry,
    encode_entry,
)
from llm_proxy.server import free_port

from ..support import (
    AUTH,
    REDIS_URL,
    UPSTREAM_KEY,
    PrivateRedis,
    bearer,
    create_project,
    create_token,
    proxy_token,
    read_events,
    require_redis,
)

pytestmark = pytest.mark.redis
Client = TestClient[Any, Any]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
FOR_A_MINUTE = {"Cache-Control": "max-age=60"}
# What differs from call to call: ours, not the answer's.
PER_CALL = frozenset(
    {
        "x-request-id",
        "cache-status",
        "age",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    }
)
HIT = re.compile(r"llm-proxy; hit; ttl=(\d+)")


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    await require_redis()
    async with Redis.from_url(REDIS_URL) as client:
        yield client


@pytest.fixture
def start_cached(start_proxy: Callable[..., Any], redis: Redis) -> Callable[..., Any]:
    """Start a proxy with the cache on the shared Redis (and extra environment)."""

    async def start(**env: str) -> Client:
        on = {"RESPONSE_CACHE": "on", "RESPONSE_CACHE_REDIS_URL": REDIS_URL}
        client: Client = await start_proxy(**{**on, **env})
        return client

    return start


@pytest.fixture
async def cached(start_cached: Callable[..., Any]) -> Client:
    client: Client = await start_cached()
    return client


def cache_of(client: Client) -> ResponseCache:
    return client.app[RESPONSE_CACHE_KEY]


def answer_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The headers of an answer without those that are ours per call."""
    return sorted(
        (k.lower(), v) for k, v in headers.items() if k.lower() not in PER_CALL
    )


async def entries_of(redis: Redis, project_id: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(f"llm-proxy:cache:{project_id}:*")]


async def get_twice(
    client: Client, token: str, path: str = "/v1/models", **headers: str
) -> tuple[aiohttp.ClientResponse, aiohttp.ClientResponse]:
    """Two GETs, the first one's answer stored (if it is) before the second."""
    first = await client.get(path, headers={**bearer(token), **headers})
    await first.read()
    await cache_of(client).drain()
    second = await client.get(path, headers={**bearer(token), **headers})
    await second.read()
    return first, second


async def post_chat(
    client: Client, token: str, body: dict[str, Any] = CHAT, **headers: str
) -> aiohttp.ClientResponse:
    response = await client.post(
        "/v1/chat/completions", json=body, headers={**bearer(token), **headers}
    )
    await response.read()
    await cache_of(client).drain()
    return response


# -- hits and misses --------------------------------------------------------------


async def test_a_hit_is_the_stored_answer_byte_for_byte_without_the_upstream(
    cached: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(cached)
    first, second = await get_twice(cached, token)
    assert first.status == second.status == 200
    assert first.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss; stored"
    hit = HIT.fullmatch(second.headers["Cache-Status"])
    assert hit is not None and 3590 <= int(hit.group(1)) <= 3600
    assert await second.read() == await first.read()
    assert answer_headers(second.headers) == answer_headers(first.headers)
    assert 0 <= int(second.headers["Age"]) <= 5
    assert second.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert "x-ratelimit-remaining-requests" in second.headers
    assert fake.requests_seen == 1


async def test_tokens_of_one_project_share_its_entries(
    cached: Client, fake: FakeUpstreamState
) -> None:
    project_id, token = await proxy_token(cached)
    other = (await create_token(cached, project_id))["token"]
    assert (await post_chat(cached, token, **FOR_A_MINUTE)).status == 200
    again = await post_chat(cached, other, **FOR_A_MINUTE)
    assert HIT.fullmatch(again.headers["Cache-Status"])
    assert fake.requests_seen == 1


async def test_two_projects_sending_the_same_call_never_share_an_answer(
    cached: Client, fake: FakeUpstreamState, redis: Redis
) -> None:
    first_project, first = await proxy_token(cached)
    second_project, second = await proxy_token(cached)
    for token in (first, second):
        answer = await post_chat(cached, token, **FOR_A_MINUTE)
        assert answer.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss; stored"
    assert fake.requests_seen == 2
    assert len(await entries_of(redis, first_project)) == 1
    assert len(await entries_of(redis, second_project)) == 1


async def test_what_changes_the_answer_changes_the_entry(
    cached: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(cached)
    await post_chat(cached, token, **FOR_A_MINUTE)
    other_body = {**CHAT, "temperature": 0}
    variants: list[tuple[dict[str, Any], dict[str, str]]] = [
        (other_body, FOR_A_MINUTE),
        (CHAT, {**FOR_A_MINUTE, "Accept-Encoding": "identity"}),
        (CHAT, {**FOR_A_MINUTE, "OpenAI-Beta": "assistants=v2"}),
        (CHAT, {**FOR_A_MINUTE, "Accept": "application/json"}),
    ]
    for body, headers in variants:
        answer = await post_chat(cached, token, body, **headers)
        assert answer.headers["Cache-Status"].startswith("llm-proxy; fwd=uri-miss")
    assert fake.requests_seen == 1 + len(variants)
    # headers that cannot change the answer are not part of the entry
    same = await post_chat(cached, token, **{**FOR_A_MINUTE, "User-Agent": "other/1"})
    assert HIT.fullmatch(same.headers["Cache-Status"])
    _, query = await get_twice(cached, token, "/v1/models?limit=1")
    assert HIT.fullmatch(query.headers["Cache-Status"])
    assert fake.requests_seen == 2 + len(variants)


async def test_a_compressed_answer_is_replayed_compressed(
    cached: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(cached)
    headers = {**bearer(token), "Accept-Encoding": "gzip", "x-fake-behaviour": "gzip"}
    bodies = []
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for _ in range(2):
            async with session.get(cached.make_url("/v1/models"), headers=headers) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                bodies.append((await r.read(), r.headers["Cache-Status"]))
            await cache_of(cached).drain()
    assert bodies[0][0] == bodies[1][0] and bodies[0][0][:2] == b"\x1f\x8b"
    assert HIT.fullmatch(bodies[1][1])
    assert fake.requests_seen == 1


async def test_with_redis_url_alone_the_fleet_and_the_cache_share_it(
    start_proxy: Callable[..., Any], redis: Redis, fake: FakeUpstreamState
) -> None:
    proxy: Client = await start_proxy(RESPONSE_CACHE="on", REDIS_URL=REDIS_URL)
    _, token = await proxy_token(proxy, max_requests=2)
    first, second = await get_twice(proxy, token)
    assert first.status == second.status == 200
    assert HIT.fullmatch(second.headers["Cache-Status"])
    # hits give their unit of the fleet's lifetime cap back
    more = [await proxy.get("/v1/models", headers=bearer(token)) for _ in range(3)]
    assert [r.status for r in more] == [200] * 3
    assert fake.requests_seen == 1


# -- what is never cached ---------------------------------------------------------


async def test_a_post_without_opt_in_is_not_cached(
    cached: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(cached)
    for _ in range(2):
        answer = await post_chat(cached, token)
        assert answer.headers["Cache-Status"] == "llm-proxy; fwd=bypass"
    assert fake.requests_seen == 2


async def test_streams_are_never_cached(
    cached: Client, fake: FakeUpstreamState, redis: Redis
) -> None:
    project_id, token = await proxy_token(cached)
    for _ in range(2):
        answer = await post_chat(
            cached, token, {**CHAT, "stream": True}, **FOR_A_MINUTE
        )
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        assert answer.headers["Cache-Status"] == "llm-proxy; fwd=bypass"
    assert fake.requests_seen == 2
    assert await entries_of(redis, project_id) == []


async def test_client_no_cache_refreshes_and_no_store_leaves_no_trace(
    cached: Client, fake: FakeUpstreamState, redis: Redis
) -> None:
    project_id, token = await proxy_token(cached)
    await get_twice(cached, token, **{"Cache-Control": "no-store"})
    assert fake.requests_seen == 2
    assert await entries_of(redis, project_id) == []
    first, refreshed = await get_twice(cached, token, **{"Cache-Control": "no-cache"})
    assert first.headers["Cache-Status"] == "llm-proxy; fwd=request; stored"
    assert refreshed.headers["Cache-Status"] == "llm-proxy; fwd=request; stored"
    assert fake.requests_seen == 4
    plain = await cached.get("/v1/models", headers=bearer(token))
    assert HIT.fullmatch(plain.headers["Cache-Status"])
    assert fake.requests_seen == 4


async def test_an_entry_older_than_the_client_accepts_is_fetched_again(
    cached: Client, fake: FakeUpstreamState, redis: Redis
) -> None:
    project_id, token = await proxy_token(cached)
    await post_chat(cached, token, **FOR_A_MINUTE)
    [key] = await entries_of(redis, project_id)
    entry = decode_entry(await redis.get(key) or b"")
    assert entry is not None
    older = replace(entry, stored_at=entry.stored_at - 5)
    await redis.set(key, encode_entry(older), keepttl=True)
    fresh_enough = await post_chat(cached, token, **FOR_A_MINUTE)
    assert HIT.fullmatch(fresh_enough.headers["Cache-Status"])
    assert int(fresh_enough.headers["Age"]) >= 5
    too_old = await post_chat(cached, token, **{"Cache-Control": "max-age=2"})
    assert too_old.headers["Cache-Status"] == "llm-proxy; fwd=stale; stored"
    assert fake.requests_seen == 2


async def test_an_answer_over_the_size_bound_is_not_stored(
    start_cached: Callable[..., Any], fake: FakeUpstreamState, redis: Redis
) -> None:
    proxy: Client = await start_cached(RESPONSE_CACHE_MAX_BYTES="64")
    project_id, token = await proxy_token(proxy)
    first, second = await get_twice(proxy, token)
    assert first.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss"
    assert second.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss"
    assert fake.requests_seen == 2
    assert await entries_of(redis, project_id) == []
    assert cache_of(proxy).stats.too_large == 2


async def test_errors_are_not_cached(cached: Client, fake: FakeUpstreamState) -> None:
    _, token = await proxy_token(cached)
    failing = {"x-fake-behaviour": "status-500"}
    first, second = await get_twice(cached, token, **failing)
    assert first.status == second.status == 500
    assert second.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss"
    assert fake.requests_seen == 2


@pytest.fixture
async def picky_upstream(aiohttp_server: AiohttpServer) -> Any:
    """An upstream whose /v1/models answer says how it may be cached (`?cc=`)."""
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.query_string)
        headers = (
            {"Cache-Control": request.query["cc"]} if "cc" in request.query else {}
        )
        return web.json_response({"object": "list", "data": []}, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = await aiohttp_server(app)
    server.seen = seen  # type: ignore[attr-defined]
    return server


async def test_the_upstream_can_forbid_or_shorten_storing(
    start_cached: Callable[..., Any], picky_upstream: Any
) -> None:
    url = str(picky_upstream.make_url("")).rstrip("/")
    proxy: Client = await start_cached(OPENAI_API_URL=url)
    _, token = await proxy_token(proxy)
    for refusal in ("no-store", "private", "no-cache"):
        _, second = await get_twice(proxy, token, f"/v1/models?cc={refusal}")
        assert second.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss"
    assert len(picky_upstream.seen) == 6
    _, short = await get_twice(proxy, token, "/v1/models?cc=max-age%3D5")
    hit = HIT.fullmatch(short.headers["Cache-Status"])
    assert hit is not None and int(hit.group(1)) <= 5
    assert len(picky_upstream.seen) == 7


# -- invalidation -----------------------------------------------------------------


async def test_a_key_rotation_starts_the_project_afresh(
    cached: Client, fake: FakeUpstreamState
) -> None:
    project_id, token = await proxy_token(cached)
    await get_twice(cached, token)
    rotated = "sk-proj-ROTATEDKEY0123456789abcdefgh"
    response = await cached.patch(
        f"/manage/projects/{project_id}", json={"openai_api_key": rotated}, headers=AUTH
    )
    assert response.status == 200
    after = await cached.get("/v1/models", headers=bearer(token))
    assert after.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss; stored"
    assert fake.requests_seen == 2
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {rotated}"


async def test_a_deactivated_project_is_refused_before_any_lookup(
    cached: Client, fake: FakeUpstreamState
) -> None:
    project_id, token = await proxy_token(cached)
    await get_twice(cached, token)
    lookups = cache_of(cached).stats.lookups
    url = f"/manage/projects/{project_id}"
    await cached.patch(url, json={"is_active": False}, headers=AUTH)
    refused = await cached.get("/v1/models", headers=bearer(token))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "project_inactive"
    assert "Cache-Status" not in refused.headers
    assert cache_of(cached).stats.lookups == lookups
    await cached.patch(url, json={"is_active": True}, headers=AUTH)
    back = await cached.get("/v1/models", headers=bearer(token))
    assert back.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss; stored"
    assert fake.requests_seen == 2


async def test_entries_expire_after_the_server_maximum(
    start_cached: Callable[..., Any], redis: Redis
) -> None:
    proxy: Client = await start_cached(RESPONSE_CACHE_TTL_MAX="30")
    project_id, token = await proxy_token(proxy)
    await post_chat(proxy, token, **{"Cache-Control": "max-age=86400"})
    [key] = await entries_of(redis, project_id)
    assert 0 < await redis.ttl(key) <= 30
    assert UPSTREAM_KEY.encode() not in key + await redis.get(key)


# -- the project's own setting ------------------------------------------------------


async def test_a_project_can_cache_its_posts_or_turn_caching_off(
    cached: Client, fake: FakeUpstreamState
) -> None:
    project = await create_project(cached, "cached-posts", cache_ttl_seconds=120)
    assert project["cache_ttl_seconds"] == 120
    token = (await create_token(cached, project["project_id"]))["token"]
    await post_chat(cached, token)
    again = await post_chat(cached, token)
    hit = HIT.fullmatch(again.headers["Cache-Status"])
    assert hit is not None and 110 <= int(hit.group(1)) <= 120
    assert fake.requests_seen == 1
    url = f"/manage/projects/{project['project_id']}"
    off = await cached.patch(url, json={"cache_ttl_seconds": 0}, headers=AUTH)
    assert (await off.json())["cache_ttl_seconds"] == 0
    _, models = await get_twice(cached, token)
    assert models.headers["Cache-Status"] == "llm-proxy; fwd=bypass"
    chat = await post_chat(cached, token, **FOR_A_MINUTE)
    assert chat.headers["Cache-Status"] == "llm-proxy; fwd=bypass"
    assert fake.requests_seen == 4


# -- accounting -----------------------------------------------------------------


async def test_the_event_says_hit_and_a_hit_used_no_upstream_tokens(
    cached: Client, tmp_path: Path
) -> None:
    _, token = await proxy_token(cached)
    await post_chat(cached, token, **FOR_A_MINUTE)
    await post_chat(cached, token, **FOR_A_MINUTE)
    await post_chat(cached, token)
    events = await read_events(tmp_path / "events.jsonl", 3)
    assert [e["cache"] for e in events] == ["miss", "hit", "bypass"]
    miss, hit, _ = events
    assert miss["usage"]["total_tokens"] > 0
    assert hit["usage"] is None and hit["usage_source"] is None
    assert hit["status_code"] == 200 and hit["bytes_out"] == miss["bytes_out"]
    assert hit["model"] == "gpt-4o-mini"


async def test_hits_do_not_spend_the_token_s_requests(
    cached: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(cached, max_requests=2)
    statuses = [
        (await post_chat(cached, token, **FOR_A_MINUTE)).status for _ in range(5)
    ]
    assert statuses == [200] * 5
    other = await post_chat(cached, token, {**CHAT, "n": 2}, **FOR_A_MINUTE)
    assert other.status == 200
    spent = await post_chat(cached, token, {**CHAT, "n": 3}, **FOR_A_MINUTE)
    assert spent.status == 429
    assert fake.requests_seen == 2


async def test_without_the_setting_nothing_changes(
    proxy: Client, fake: FakeUpstreamState, tmp_path: Path
) -> None:
    assert RESPONSE_CACHE_KEY not in proxy.app
    _, token = await proxy_token(proxy)
    for _ in range(2):
        answer = await proxy.get("/v1/models", headers=bearer(token))
        assert answer.status == 200 and "Cache-Status" not in answer.headers
    assert fake.requests_seen == 2
    events = await read_events(tmp_path / "events.jsonl", 2)
    assert [e["cache"] for e in events] == [None, None]


# -- Redis away ---------------------------------------------------------------------


def metric_lines(text: str, name: str) -> Iterable[str]:
    return (line for line in text.splitlines() if line.startswith(name))


async def test_without_redis_calls_are_served_from_the_upstream(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    proxy: Client = await start_proxy(
        RESPONSE_CACHE="on", RESPONSE_CACHE_REDIS_URL=nowhere
    )
    _, token = await proxy_token(proxy)
    first, second = await get_twice(proxy, token)
    for answer in (first, second):
        assert answer.status == 200
        expected = "llm-proxy; fwd=bypass; detail=redis-unavailable"
        assert answer.headers["Cache-Status"] == expected
    assert fake.requests_seen == 2
    stats = cache_of(proxy).stats
    assert stats.errors == 1 and stats.down  # the second call did not try again
    metrics = await (await proxy.get("/metrics")).text()
    assert "llm_proxy_response_cache_down 1.0" in metrics
    assert list(metric_lines(metrics, "llm_proxy_response_cache_errors_total 1.0"))


async def test_when_redis_comes_back_the_cache_works_again(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        proxy: Client = await start_proxy(
            RESPONSE_CACHE="on", RESPONSE_CACHE_REDIS_URL=server.url
        )
        _, token = await proxy_token(proxy)
        _, hit = await get_twice(proxy, token)
        assert HIT.fullmatch(hit.headers["Cache-Status"])
        await server.stop()
        away = await proxy.get("/v1/models", headers=bearer(token))
        assert away.status == 200
        assert away.headers["Cache-Status"].endswith("detail=redis-unavailable")
        await server.start()  # empty: it kept nothing
        await asyncio.sleep(RETRY_AFTER_S + 0.1)
        first, second = await get_twice(proxy, token)
        assert first.headers["Cache-Status"] == "llm-proxy; fwd=uri-miss; stored"
        assert HIT.fullmatch(second.headers["Cache-Status"])
        assert fake.requests_seen == 3
        assert not cache_of(proxy).stats.down
    finally:
        await server.stop()
