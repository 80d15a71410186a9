"""What a call's event says matches what happened on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from .support import bearer, proxy_token


async def read_events(path: Path, count: int) -> list[dict[str, Any]]:
    """The event log's lines, once there are at least `count`."""
    async with asyncio.timeout(5):
        while True:
            lines = path.read_bytes().splitlines() if path.exists() else []
            if len(lines) >= count:
                return [orjson.loads(line) for line in lines]
            await asyncio.sleep(0.02)


async def test_our_own_error_answers_count_their_body_in_bytes_out(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
    refused = await proxy.get("/v1/models", headers=bearer("wt-not-a-token"))
    unknown = await proxy.get("/v1/nowhere", headers=bearer(token))
    bodies = [await refused.read(), await unknown.read()]
    assert (refused.status, unknown.status) == (401, 404)
    events = await read_events(log_file, 2)
    assert [e["status_code"] for e in events] == [401, 404]
    assert [e["bytes_out"] for e in events] == [len(body) for body in bodies]
