"""A standalone `llm-proxy dispatcher` exports its lag and health on /metrics."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from llm_proxy.config import Settings
from llm_proxy.dispatchers import run_dispatcher
from llm_proxy.events.model import RequestCompleted
from llm_proxy.events.redis_bus import RedisEventBus
from llm_proxy.server import free_port

from ..support import MANAGEMENT_TOKEN, REDIS_URL, require_redis

pytestmark = pytest.mark.redis


async def test_standalone_dispatcher_serves_its_metrics(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    await require_redis()
    delivered = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        delivered.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/ingest", receive)
    collector = await aiohttp_server(app)
    key = f"llm-proxy-test:{uuid.uuid4().hex}"
    port = free_port()
    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "REDIS_URL": REDIS_URL,
            "DEAD_LETTER_DIR": str(tmp_path),
            "DISPATCHER_METRICS_ADDR": f"127.0.0.1:{port}",
            "METRICS_TOKEN": "metrics-token-0123456789",
        }
    )
    producer = RedisEventBus(REDIS_URL, stream_key=key, spool_path=tmp_path / "s")
    await producer.start()
    task = asyncio.create_task(
        run_dispatcher(
            settings,
            "http",
            endpoint=str(collector.make_url("/ingest")),
            flush_interval_s=0.05,
            stream_key=key,
        )
    )
    try:
        producer.publish(
            RequestCompleted(
                request_id="r",
                project_id="p",
                token_id="t",
                method="GET",
                endpoint="/v1/models",
                path="/v1/models",
                status_code=200,
                duration_ms=1.0,
            )
        )
        async with asyncio.timeout(10):
            await delivered.wait()
        url = f"http://127.0.0.1:{port}/metrics"
        auth = {"Authorization": "Bearer metrics-token-0123456789"}
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as refused:
                assert refused.status == 401
            async with asyncio.timeout(10):
                while True:
                    async with session.get(url, headers=auth) as response:
                        text = await response.text()
                    if 'llm_proxy_dispatcher_healthy{service="http"} 1.0' in text:
                        break
                    await asyncio.sleep(0.05)
        assert 'llm_proxy_dispatcher_lag_seconds{service="http"}' in text
        assert (
            'llm_proxy_dispatcher_events_total{outcome="delivered",service="http"}'
            in text
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await producer.close()
        cleanup = Redis.from_url(REDIS_URL)
        await cleanup.delete(key)
        await cleanup.aclose()


def test_dispatcher_metrics_addr_is_validated() -> None:
    from llm_proxy.config import ConfigError

    with pytest.raises(ConfigError, match="DISPATCHER_METRICS_ADDR"):
        Settings.from_env(
            {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "DISPATCHER_METRICS_ADDR": "nope"}
        )
