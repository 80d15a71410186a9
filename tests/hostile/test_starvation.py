"""One tenant holding its cap of slow streams cannot starve another tenant."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import bearer, proxy_token

Client = TestClient[Any, Any]
CHAT_STREAM = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
HOG_CAP = 30
POOL = 40  # smaller than the hog's attempts: without caps it would fill the pool
VICTIM_CALLS = 50


async def hog_call(proxy: Client, token: str) -> ClientResponse:
    """A 30 s stream (one event, then a pause): it holds its slot and connection."""
    headers = {**bearer(token), "x-fake-behaviour": "slow-stream=30"}
    return await proxy.post("/v1/chat/completions", json=CHAT_STREAM, headers=headers)


async def time_to_first_byte(proxy: Client, token: str) -> float:
    """Seconds from sending a streamed call to its first body byte."""
    started = time.perf_counter()
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT_STREAM, headers=bearer(token)
    )
    assert response.status == 200, await response.text()
    assert await response.content.readany()
    elapsed = time.perf_counter() - started
    await response.read()
    return elapsed


async def victim_ttfbs(proxy: Client, token: str) -> list[float]:
    """TTFB of VICTIM_CALLS calls one after another, with asyncio's debug mode off.

    The suite runs the loop in debug mode (it reports slow callbacks), which costs
    several ms per call on its own; the number wanted is the proxy's.
    """
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(False)
    try:
        return [await time_to_first_byte(proxy, token) for _ in range(VICTIM_CALLS)]
    finally:
        loop.set_debug(debug)


async def test_other_tenant_ttfb_stays_low_while_one_token_holds_its_cap(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(
        TOKEN_MAX_CONCURRENT=str(HOG_CAP),
        UPSTREAM_MAX_CONNECTIONS=str(POOL),
        UPSTREAM_POOL_TIMEOUT="30",  # the caps, not the pool timeout, must protect
    )
    _, hog = await proxy_token(proxy)
    _, victim = await proxy_token(proxy)
    attempts = [asyncio.create_task(hog_call(proxy, hog)) for _ in range(2 * HOG_CAP)]
    try:
        done, pending = await asyncio.wait(attempts, timeout=10)
        assert not pending, f"{len(pending)} hog calls still wait for the pool"
        statuses = sorted(task.result().status for task in done)
        assert statuses == [200] * HOG_CAP + [429] * HOG_CAP
        await fake.wait_for(lambda state: state.open_streams == HOG_CAP, timeout_s=10)
        ttfbs = await victim_ttfbs(proxy, victim)
        p50 = statistics.median(ttfbs)
        p99 = statistics.quantiles(ttfbs, n=100, method="inclusive")[98]
        print(
            f"victim TTFB with {HOG_CAP} hog streams held: p50 {p50 * 1000:.1f} ms,"
            f" p99 {p99 * 1000:.1f} ms"
        )
        assert fake.open_streams == HOG_CAP  # the hog held its cap throughout
        assert p50 < 0.05  # generous: a few ms on an idle machine
    finally:
        for task in attempts:
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
