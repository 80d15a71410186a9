"""`llm-proxy dispatcher` as a real process on the real Redis: kill -9 mid-batch loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from llm_proxy.events.model import RequestCompleted
from llm_proxy.events.redis_bus import RedisEventBus

from ..support import REDIS_URL, require_redis

EVENTS = 60

pytestmark = pytest.mark.redis


class Collector:
    """An HTTP backend that holds the very first batch until told to let it go."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.all_accepted = asyncio.Event()
        self.accepted: list[str] = []
        self.first_batch_arrived = asyncio.Event()
        self.release_first = asyncio.Event()
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        batch = await request.json()
        self.calls += 1
        if self.calls == 1:
            self.first_batch_arrived.set()
            await self.release_first.wait()
        self.accepted.extend(event["event_id"] for event in batch)
        if len(set(self.accepted)) >= self.expected:
            self.all_accepted.set()
        return web.json_response({"ok": True})


async def _publish(stream_key: str, spool: Path) -> list[str]:
    bus = RedisEventBus(REDIS_URL, stream_key=stream_key, spool_path=spool)
    await bus.start()
    events = [
        RequestCompleted(
            request_id=f"req-{n}",
            project_id="p",
            token_id="t",
            method="POST",
            endpoint="/v1/chat/completions",
            path="/v1/chat/completions",
            status_code=200,
            duration_ms=1.0,
        )
        for n in range(EVENTS)
    ]
    for event in events:
        bus.publish(event)
    await bus.close()
    return [event.event_id for event in events]


async def _dispatcher(
    url: str, stream_key: str, workdir: Path
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "MANAGEMENT_TOKEN": "dispatcher-test-token-0123456789",
        "EVENT_STREAM_KEY": stream_key,
        "DEAD_LETTER_DIR": str(workdir),
        "LOG_LEVEL": "warning",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_proxy",
        "dispatcher",
        "--service",
        "http",
        "--endpoint",
        url,
        "--batch-size",
        "10",
        "--flush-interval",
        "0.05",
        "--consumer-name",
        "worker-1",
        env=env,
        cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_dispatcher_killed_mid_batch_delivers_every_event_once_after_restart(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    await require_redis()
    stream_key = f"test-dispatcher-{uuid.uuid4().hex}"
    collector = Collector(EVENTS)
    app = web.Application()
    app.router.add_post("/events", collector.handle)
    server = await aiohttp_server(app)
    url = str(server.make_url("/events"))
    published = await _publish(stream_key, tmp_path / "spool.jsonl")
    try:
        first = await _dispatcher(url, stream_key, tmp_path)
        async with asyncio.timeout(30):
            await collector.first_batch_arrived.wait()
        first.send_signal(signal.SIGKILL)  # mid-batch: the backend has it, no ack yet
        assert await first.wait() == -signal.SIGKILL
        collector.release_first.set()

        second = await _dispatcher(url, stream_key, tmp_path)
        async with asyncio.timeout(30):
            await collector.all_accepted.wait()
        second.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await second.wait()
        stderr = (await second.stderr.read()).decode() if second.stderr else ""
        assert code == 0, stderr
    finally:
        client = Redis.from_url(REDIS_URL)
        await client.delete(stream_key)
        await client.aclose()
    assert sorted(set(collector.accepted)) == sorted(published)
    duplicates = len(collector.accepted) - len(set(collector.accepted))
    assert duplicates <= 10, (
        "at most the batch in flight at the kill is delivered twice"
    )
    assert not list(tmp_path.glob("dead-letter*"))
