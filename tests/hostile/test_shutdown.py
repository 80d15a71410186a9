"""Shutdown with streams open: one grace period, then the cut streams say `shutdown`.

The runner's cleanup is what SIGTERM runs in `serve()`; the real-process variant is
in tests/test_server_process.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import ListenerSettings, Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import open_stalled_stream
from .listening import ListenerTestServer

GRACE_S = 1.5
StartGuarded = Callable[[], Awaitable[tuple[TestClient[Any, Any], ListenerTestServer]]]


@pytest.fixture
def start_guarded(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> StartGuarded:
    """The proxy behind the listener, with a short shutdown grace period."""

    async def start() -> tuple[TestClient[Any, Any], ListenerTestServer]:
        # No tiktoken estimate for the cut stream: its first load takes seconds.
        settings = Settings.from_env({**proxy_env, "USAGE_ESTIMATION": "off"})
        server = ListenerTestServer(
            create_app(settings),
            ListenerSettings(max_connections=100),
            shutdown_timeout=GRACE_S,
        )
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client, server

    return start


def _chat_events(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines() if log.exists() else []
    events = [json.loads(line) for line in lines]
    return [e for e in events if e.get("path") == "/v1/chat/completions"]


async def test_shutdown_cuts_an_open_stream_after_one_grace_period(
    start_guarded: StartGuarded, fake: FakeUpstreamState, tmp_path: Path
) -> None:
    client, server = await start_guarded()
    response = await open_stalled_stream(client)
    assert response.status == 200
    await response.content.readuntil(b"\n\n")  # the first event came through
    started = time.monotonic()
    await server.close()  # stop listening, wait for in-flight calls, clean up
    took = time.monotonic() - started
    assert took >= GRACE_S * 0.9  # the stream had its grace period...
    assert took < GRACE_S * 1.6  # ...once, not twice
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()  # cut, not ended as if complete
    [event] = _chat_events(tmp_path / "events.jsonl")
    assert event["error"] == "shutdown"
    assert event["status_code"] == 200 and event["stream"] is True
    await fake.wait_for(lambda state: state.streams_cancelled == 1)


async def test_stream_that_ends_within_the_grace_period_is_not_cut(
    start_guarded: StartGuarded, fake: FakeUpstreamState, tmp_path: Path
) -> None:
    client, server = await start_guarded()
    response = await open_stalled_stream(client)
    await response.content.readuntil(b"\n\n")
    closing = asyncio.ensure_future(server.close())
    await asyncio.sleep(GRACE_S / 3)
    assert not closing.done()  # waiting for the stream
    fake.release()
    body = await response.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    await closing
    [event] = _chat_events(tmp_path / "events.jsonl")
    assert event["error"] is None
