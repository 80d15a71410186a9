"""On the memory bus, LOGGING_URL and the Helicone and Lunary keys start their
dispatchers inside the proxy, as FILE_EVENT_LOG does; each backend gets its own key."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llm_proxy.config import ConfigError, Settings
from llm_proxy.dispatchers import in_process_services

from ..support import MANAGEMENT_TOKEN, bearer, proxy_token

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_logging_url_and_backend_keys_deliver_from_the_proxy_process(
    aiohttp_server: AiohttpServer, start_proxy: Callable[..., Any]
) -> None:
    received: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    all_three = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        auth = request.headers.get("Authorization", "")
        backend = request.match_info["backend"]
        received[backend].append((auth, body))
        if set(received) == {"http", "helicone", "lunary"}:
            all_three.set()
        # Each service's own way of saying "stored".
        return web.Response(text="ok" if backend == "helicone" else '{"results": []}')

    app = web.Application()
    app.router.add_post("/{backend}", receive)
    collector = await aiohttp_server(app)
    proxy = await start_proxy(
        LOGGING_URL=str(collector.make_url("/http")),
        DISPATCHER_API_KEY="collector-key",
        HELICONE_API_KEY="sk-helicone-test",
        HELICONE_URL=str(collector.make_url("/helicone")),
        LUNARY_PUBLIC_KEY="lunary-public-test",
        LUNARY_URL=str(collector.make_url("/lunary")),
        EVENT_FLUSH_INTERVAL="0.05",
    )
    _, token = await proxy_token(proxy)
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT, headers=bearer(token)
    )
    assert response.status == 200
    async with asyncio.timeout(10):
        await all_three.wait()
    assert {auth for auth, _ in received["http"]} == {"Bearer collector-key"}
    assert {auth for auth, _ in received["helicone"]} == {"Bearer sk-helicone-test"}
    assert {auth for auth, _ in received["lunary"]} == {"Bearer lunary-public-test"}
    (_, batch), *_ = received["http"]
    assert batch[0]["path"] == "/v1/chat/completions"


def test_backend_urls_must_be_http() -> None:
    for name in ("HELICONE_URL", "LUNARY_URL"):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, name: "ftp://x"})


def test_on_the_redis_bus_only_the_file_dispatcher_runs_in_the_proxy() -> None:
    env = {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "LOGGING_URL": "http://collector.example/events",
        "HELICONE_API_KEY": "sk-helicone-test",
        "LUNARY_PUBLIC_KEY": "lunary-public-test",
    }
    memory = Settings.from_env(env)
    assert in_process_services(memory) == ["file", "http", "helicone", "lunary"]
    redis = Settings.from_env(
        {**env, "LLM_PROXY_EVENT_BUS": "redis", "REDIS_URL": "redis://127.0.0.1:6379"}
    )
    assert in_process_services(redis) == ["file"]
