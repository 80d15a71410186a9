"""CORS on /v1 over real sockets: preflights answered by the proxy, allowed origins
echoed on proxied answers, streams and the proxy's own errors, refused origins and
browser-only tokens refused before anything reaches the upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import TOKEN_STORE_KEY

from ..support import AUTH, bearer, create_project, create_token, read_events

Client = TestClient[Any, Any]
Start = Callable[..., Any]

APP = "https://app.example.com"
OTHER = "https://other.example.net"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def project_token(client: Client, name: str, **fields: Any) -> tuple[str, str]:
    """A project with these fields and a token of it: (project id, token value)."""
    project = await create_project(client, name, **fields)
    token = await create_token(client, project["project_id"])
    return project["project_id"], token["token"]


def assert_cors(response: Any, origin: str) -> None:
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == origin
    assert "origin" in [v.strip().lower() for v in headers.getall("Vary", [])]
    exposed = headers["Access-Control-Expose-Headers"].split(", ")
    assert {"x-request-id", "x-ratelimit-remaining-requests", "retry-after"} <= set(
        exposed
    )


def assert_no_cors(response: Any) -> None:
    assert not [h for h in response.headers if h.lower().startswith("access-control")]


async def assert_refused(response: Any, code: str) -> None:
    assert response.status == 403, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert_no_cors(response)


# -- calls without an Origin: as before ------------------------------------------------


async def test_a_call_without_origin_gets_no_cors_headers(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    _, token = await project_token(proxy, "plain", allowed_origins=[OTHER])
    response = await proxy.get("/v1/models", headers=bearer(token))
    assert response.status == 200
    assert_no_cors(response)
    assert "Origin" not in fake.requests[-1].headers


# -- allowed origins ---------------------------------------------------------------------


async def test_an_allowed_origin_is_echoed_on_the_proxied_answer(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    _, token = await project_token(proxy, "web")
    response = await proxy.get("/v1/models", headers={**bearer(token), "Origin": APP})
    assert response.status == 200
    assert_cors(response, APP)
    assert fake.requests[-1].headers["Origin"] == APP  # forwarded as it came


async def test_the_upstreams_cors_headers_are_replaced_and_its_vary_kept(
    aiohttp_server: AiohttpServer, make_client: Start
) -> None:
    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": []},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Credentials": "true",
                "access-control-max-age": "86400",
                "Vary": "Accept-Encoding",
            },
        )

    upstream = web.Application()
    upstream.router.add_get("/v1/models", models)
    server = await aiohttp_server(upstream)
    proxy = await make_client(
        OPENAI_API_URL=str(server.make_url("")).rstrip("/"),
        CORS_ALLOWED_ORIGINS=APP,
    )
    _, token = await project_token(proxy, "web")
    response = await proxy.get("/v1/models", headers={**bearer(token), "Origin": APP})
    assert response.status == 200
    assert_cors(response, APP)
    assert response.headers.getall("Access-Control-Allow-Origin") == [APP]
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Access-Control-Max-Age" not in response.headers
    assert response.headers.getall("Vary") == ["Accept-Encoding", "Origin"]
    plain = await proxy.get("/v1/models", headers=bearer(token))
    assert plain.headers["Access-Control-Allow-Origin"] == "*"  # no Origin: as is


async def test_a_stream_carries_the_cors_headers_before_its_first_event(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy()
    _, token = await project_token(
        proxy, "web", allowed_origins=["https://*.example.com"]
    )
    headers = {
        **bearer(token),
        "Origin": APP,
        "x-fake-behaviour": "stall-after-first-event",
    }
    body = {**CHAT, "stream": True}
    async with asyncio.timeout(5):
        response = await proxy.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status == 200
        assert_cors(response, APP)
        first = await response.content.readuntil(b"\n\n")
    assert first.startswith(b"data: ")
    fake.release()
    rest = await response.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_the_proxys_own_errors_carry_the_cors_headers(
    start_proxy: Start,
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    origin = {"Origin": APP}
    unknown = await proxy.get("/v1/models", headers={**bearer("wt-nope"), **origin})
    assert unknown.status == 401
    assert_cors(unknown, APP)
    missing = await proxy.get("/v1/nowhere", headers=origin)
    assert missing.status == 404
    assert_cors(missing, APP)
    _, token = await project_token(proxy, "web")
    limited = await create_token(
        proxy,
        (await create_project(proxy, "limited"))["project_id"],
        rate_limit_per_hour=1,
    )
    call = {**bearer(limited["token"]), **origin}
    assert (await proxy.get("/v1/models", headers=call)).status == 200
    refused = await proxy.get("/v1/models", headers=call)
    assert refused.status == 429 and "Retry-After" in refused.headers
    assert_cors(refused, APP)
    body = await refused.json()
    assert body["error"]["code"] == "rate_limit_exceeded"


async def test_an_unreachable_upstream_answers_502_with_cors_headers(
    make_client: Start,
) -> None:
    proxy = await make_client(CORS_ALLOWED_ORIGINS=APP, UPSTREAM_RETRIES="0")
    _, token = await project_token(proxy, "web")
    response = await proxy.get("/v1/models", headers={**bearer(token), "Origin": APP})
    assert response.status == 502
    assert_cors(response, APP)


# -- refused origins ---------------------------------------------------------------------


async def test_an_origin_allowed_nowhere_is_refused_before_the_upstream(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    _, token = await project_token(proxy, "web")
    before = len(fake.requests)
    for origin in (OTHER, "null", APP.upper(), APP + ":443", "https://a." + APP[8:]):
        response = await proxy.get(
            "/v1/models", headers={**bearer(token), "Origin": origin}
        )
        await assert_refused(response, "origin_not_allowed")
    assert len(fake.requests) == before


async def test_with_no_origins_anywhere_a_call_with_origin_is_served_as_before(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    # nothing lists an origin: same-origin pages, extensions and desktop apps that
    # send Origin keep working; without CORS headers browsers keep same-origin
    proxy = await start_proxy()
    _, token = await project_token(proxy, "plain")
    before = len(fake.requests)
    response = await proxy.get("/v1/models", headers={**bearer(token), "Origin": OTHER})
    assert response.status == 200
    assert_no_cors(response)
    assert len(fake.requests) == before + 1


async def test_a_project_without_origins_gets_no_cors_headers_from_another_projects(
    start_proxy: Start,
) -> None:
    proxy = await start_proxy()
    await project_token(proxy, "web", allowed_origins=[APP])
    _, plain = await project_token(proxy, "plain")
    response = await proxy.get("/v1/models", headers={**bearer(plain), "Origin": APP})
    assert response.status == 200
    assert_no_cors(response)  # "plain" never opted in: its answers stay same-origin


async def test_a_projects_own_list_replaces_the_server_wide_one(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    _, own = await project_token(proxy, "own", allowed_origins=[OTHER])
    _, plain = await project_token(proxy, "plain")
    before = len(fake.requests)
    # OTHER is allowed by some project, so the preflight would pass; the call is
    # checked against its token's project.
    await assert_refused(
        await proxy.get("/v1/models", headers={**bearer(plain), "Origin": OTHER}),
        "origin_not_allowed",
    )
    await assert_refused(
        await proxy.get("/v1/models", headers={**bearer(own), "Origin": APP}),
        "origin_not_allowed",
    )
    assert len(fake.requests) == before
    allowed = await proxy.get("/v1/models", headers={**bearer(own), "Origin": OTHER})
    assert allowed.status == 200
    assert_cors(allowed, OTHER)


async def test_a_refused_origin_spends_no_quota(start_proxy: Start) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    project = await create_project(proxy, "own", allowed_origins=[OTHER])
    token = await create_token(proxy, project["project_id"], max_requests=1)
    call = bearer(token["token"])
    for _ in range(3):
        response = await proxy.get("/v1/models", headers={**call, "Origin": APP})
        await assert_refused(response, "origin_not_allowed")
    assert (await proxy.get("/v1/models", headers=call)).status == 200


async def test_a_browser_only_token_needs_an_origin(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy()
    project = await create_project(
        proxy, "browser", allowed_origins=[APP], require_origin=True
    )
    project_id = project["project_id"]
    token = (await create_token(proxy, project_id, max_requests=2))["token"]
    before = len(fake.requests)
    for _ in range(3):  # refused without spending the token's two requests
        await assert_refused(
            await proxy.get("/v1/models", headers=bearer(token)), "origin_required"
        )
    assert len(fake.requests) == before
    allowed = await proxy.get("/v1/models", headers={**bearer(token), "Origin": APP})
    assert allowed.status == 200
    await proxy.patch(
        f"/manage/projects/{project_id}", json={"require_origin": False}, headers=AUTH
    )
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200


# -- preflights -------------------------------------------------------------------------


def preflight_headers(
    origin: str, method: str = "POST", **extra: str
) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method, **extra}


async def test_a_preflight_is_answered_without_a_token_or_the_upstream(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP, CORS_MAX_AGE="30")
    requested = "authorization, content-type, x-stainless-os, x-evil, Authorization"
    response = await proxy.options(
        "/v1/chat/completions",
        headers=preflight_headers(APP, **{"Access-Control-Request-Headers": requested}),
    )
    assert response.status == 204, await response.text()
    headers = response.headers
    assert headers["Access-Control-Allow-Origin"] == APP
    assert headers["Access-Control-Allow-Methods"] == "POST"
    assert headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-stainless-os"
    )
    assert headers["Access-Control-Max-Age"] == "30"
    assert headers["Vary"].startswith("Origin")
    assert "Access-Control-Allow-Credentials" not in headers
    assert await response.read() == b""
    files = await proxy.options("/v1/files", headers=preflight_headers(APP, "GET"))
    assert files.headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert fake.requests == []


async def test_a_preflight_from_an_origin_allowed_nowhere_is_refused(
    start_proxy: Start,
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    response = await proxy.options(
        "/v1/chat/completions", headers=preflight_headers(OTHER)
    )
    await assert_refused(response, "origin_not_allowed")


async def test_a_preflight_for_a_refused_path_or_method_is_shaped_as_today(
    start_proxy: Start,
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    unknown = await proxy.options("/v1/nowhere", headers=preflight_headers(APP))
    assert unknown.status == 404
    assert (await unknown.json())["error"]["code"] == "unknown_endpoint"
    assert_cors(unknown, APP)
    tricky = await proxy.options("/v1/models/", headers=preflight_headers(APP, "GET"))
    assert tricky.status == 404
    method = await proxy.options(
        "/v1/chat/completions", headers=preflight_headers(APP, "DELETE")
    )
    assert method.status == 405 and method.headers["Allow"] == "POST"
    assert (await method.json())["error"]["code"] == "method_not_allowed"


async def test_an_options_call_that_is_no_preflight_behaves_as_before(
    start_proxy: Start, fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(CORS_ALLOWED_ORIGINS=APP)
    bare = await proxy.options("/v1/models")
    assert bare.status == 405 and bare.headers["Allow"] == "GET"
    assert_no_cors(bare)
    origin_only = await proxy.options("/v1/models", headers={"Origin": APP})
    assert origin_only.status == 405
    assert_cors(origin_only, APP)
    assert fake.requests == []


async def test_a_preflight_follows_the_projects_origins_as_they_change(
    start_proxy: Start,
) -> None:
    proxy = await start_proxy()
    project = await create_project(
        proxy, "web", allowed_origins=["https://*.example.com"]
    )
    url = f"/manage/projects/{project['project_id']}"

    async def preflight_status() -> int:
        response = await proxy.options(
            "/v1/chat/completions", headers=preflight_headers(APP)
        )
        return response.status

    assert await preflight_status() == 204
    await proxy.patch(url, json={"is_active": False}, headers=AUTH)
    assert await preflight_status() == 403
    await proxy.patch(url, json={"is_active": True}, headers=AUTH)
    assert await preflight_status() == 204
    await proxy.patch(url, json={"allowed_origins": [OTHER]}, headers=AUTH)
    assert await preflight_status() == 403
    await proxy.delete(url, headers=AUTH)
    assert len(proxy.app[TOKEN_STORE_KEY].origin_index) == 0


async def test_a_refused_origin_is_recorded_as_a_call(
    start_proxy: Start, tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(
        FILE_EVENT_LOG=str(log_file),
        EVENT_FLUSH_INTERVAL="0.01",
        CORS_ALLOWED_ORIGINS=APP,
    )
    _, token = await project_token(proxy, "web")
    response = await proxy.post(
        "/v1/chat/completions?x=1",
        json=CHAT,
        headers={**bearer(token), "Origin": OTHER},
    )
    await assert_refused(response, "origin_not_allowed")
    [event] = await read_events(log_file, 1)
    assert (event["status_code"], event["error"], event["path"]) == (
        403,
        "origin_not_allowed",
        "/v1/chat/completions",
    )
