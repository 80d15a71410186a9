"""CORS in a real headless Chromium (Debian's package, driven by Playwright): a page of
an allowed origin streams a chat through the proxy with `fetch` and a ReadableStream
reader; the same page served from another origin is blocked by the browser and by the
proxy, and nothing of it reaches the upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import async_playwright
from pytest_aiohttp import AiohttpServer

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import AUTH, read_events
from .test_admin_browser import CHROMIUM, CHROMIUM_ARGS, _require_chromium

pytestmark = pytest.mark.browser

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chat page</title></head>
<body><h1>A page calling the proxy</h1></body></html>"""

# Runs in the page: a streamed chat completion read chunk by chunk.
STREAM_CHAT = """async ([proxy, token]) => {
  const response = await fetch(proxy + "/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    body: JSON.stringify({
      model: "gpt-4o-mini",
      messages: [{role: "user", content: "hi"}],
      stream: true,
    }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "", reads = 0;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    reads += 1;
    text += decoder.decode(value, {stream: true});
  }
  return {
    status: response.status,
    requestId: response.headers.get("x-request-id"),
    remaining: response.headers.get("x-ratelimit-remaining-requests"),
    reads,
    text,
  };
}"""
# Runs in the page: the same call, and a simple (not preflighted) one, as errors.
BLOCKED_CALLS = """async ([proxy, token]) => {
  const outcome = async (call) => {
    try { const r = await call(); return "read " + r.status; }
    catch (error) { return error.name + ": " + error.message; }
  };
  return [
    await outcome(() => fetch(proxy + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({model: "gpt-4o-mini", messages: [], stream: true}),
    })),
    await outcome(() => fetch(proxy + "/v1/chat/completions", {
      method: "POST", body: "{}",
    })),
  ];
}"""


async def page_server(aiohttp_server: AiohttpServer) -> TestServer:
    """A web server of one page: its origin is its own port on 127.0.0.1."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    return await aiohttp_server(app)


def origin_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    _require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def test_browser_streams_from_an_allowed_origin_and_is_blocked_from_another(
    aiohttp_server: AiohttpServer,
    proxy_env: dict[str, str],
    fake: FakeUpstreamState,
    chromium: Any,
    tmp_path: Path,
) -> None:
    allowed, other = (
        await page_server(aiohttp_server),
        await page_server(aiohttp_server),
    )
    events = tmp_path / "cors-events.jsonl"
    settings = Settings.from_env(
        {**proxy_env, "FILE_EVENT_LOG": str(events), "EVENT_FLUSH_INTERVAL": "0.01"}
    )
    proxy = await aiohttp_server(create_app(settings))
    proxy_url = origin_of(proxy)
    token = await _browser_token(proxy_url, origin_of(allowed))
    fake.chunk_delay_s = 0.02  # events apart, so the page reads them apart

    page = await chromium.new_page()
    await page.goto(origin_of(allowed) + "/")
    result = await page.evaluate(STREAM_CHAT, [proxy_url, token])
    assert result["status"] == 200
    assert result["requestId"] and result["remaining"]  # exposed to the page
    assert result["reads"] >= 2
    assert result["text"].count("data: ") > 2
    assert result["text"].rstrip().endswith("data: [DONE]")
    assert len(fake.requests) == 1

    await page.goto(origin_of(other) + "/")
    outcomes = await page.evaluate(BLOCKED_CALLS, [proxy_url, token])
    assert outcomes == ["TypeError: Failed to fetch"] * 2
    assert len(fake.requests) == 1  # neither blocked call reached the upstream
    logged = await read_events(events, 2)
    refused = logged[-1]  # the simple call, sent without a token: refused as such,
    # and without CORS headers the browser does not let the page read it
    assert (refused["status_code"], refused["error"]) == (401, "missing_api_key")
    await _proxy_refuses(proxy_url, origin_of(other), token)
    assert len(fake.requests) == 1
    await page.close()


async def _browser_token(proxy_url: str, page_origin: str) -> str:
    """A project whose tokens only pages of `page_origin` may use, and a token."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        body = {
            "name": "web app",
            "openai_api_key": "sk-proj-UPSTREAMSECRETKEY0123456789abcd",
            "allowed_origins": [page_origin],
            "require_origin": True,
        }
        async with session.post(f"{proxy_url}/manage/projects", json=body) as created:
            assert created.status == 201, await created.text()
            project = await created.json()
        body = {"project_id": project["project_id"], "duration_minutes": 10}
        async with session.post(f"{proxy_url}/manage/tokens", json=body) as minted:
            assert minted.status == 201
            token: str = (await minted.json())["token"]
    return token


async def _proxy_refuses(proxy_url: str, origin: str, token: str) -> None:
    """What the browser got from the proxy: the preflight and the call refused, in
    OpenAI's shape, with no Access-Control-Allow-Origin."""
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    call = {"Origin": origin, "Authorization": f"Bearer {token}"}
    url = f"{proxy_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for method, headers in (("OPTIONS", preflight), ("POST", call)):
            async with session.request(method, url, headers=headers, json={}) as answer:
                assert answer.status == 403
                error = json.loads(await answer.read())["error"]
                assert error["code"] == "origin_not_allowed"
                assert set(error) == {"message", "type", "param", "code"}
                assert "Access-Control-Allow-Origin" not in answer.headers
