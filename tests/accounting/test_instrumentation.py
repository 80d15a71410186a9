"""One event per proxied call, with exact usage, through the real app and fake upstream."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.accounting.instrumentation import (
    INSTRUMENTATION_KEY,
    Instrumentation,
    ProcessEstimator,
    account_usage,
    estimate_from,
    estimate_input,
)
from llm_proxy.accounting.usage import Usage
from llm_proxy.config import EventSettings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState, load_fixture
from llm_proxy.events.lifecycle import EVENT_BUS_KEY
from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.events.model import RequestCompleted, Subscription
from llm_proxy.proxy.capture import ResponseCapture
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.server import process_alive

from ..support import bearer, open_stalled_stream, proxy_token

Client = TestClient[Any, Any]
StartProxy = Callable[..., Any]


def estimate_here(exchange: Exchange) -> Usage:
    """The estimate, computed in this process."""
    return estimate_from(estimate_input(exchange))


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
FAST = {"EVENT_FLUSH_INTERVAL": "0.01"}


async def next_events(sub: Subscription, count: int) -> list[RequestCompleted]:
    """The next `count` events of a subscription (fails after 5 s)."""
    events: list[RequestCompleted] = []
    async with asyncio.timeout(5):
        while len(events) < count:
            events += await anext(sub)
    return events


async def watched(start_proxy: StartProxy, **env: str) -> tuple[Client, Subscription]:
    """A proxy with fast event batches and a subscription to its bus."""
    client: Client = await start_proxy(**{**FAST, **env})
    return client, client.app[EVENT_BUS_KEY].subscribe("test")


async def one_event(sub: Subscription) -> RequestCompleted:
    [event] = await next_events(sub, 1)
    return event


async def test_instrumentation_publishes_an_event_for_every_refusal_and_success(
    start_proxy: StartProxy,
) -> None:
    proxy, sub = await watched(start_proxy, DEFAULT_RATE_LIMIT_PER_HOUR="1")
    project_id, token = await proxy_token(proxy)
    assert (await proxy.post("/v1/chat/completions", json=CHAT)).status == 401
    assert (await proxy.get("/v1/nowhere", headers=bearer(token))).status == 404
    ok = await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert ok.status == 200
    limited = await proxy.get("/v1/models", headers=bearer(token))
    assert limited.status == 429
    events = await next_events(sub, 4)
    assert [e.status_code for e in events] == [401, 404, 200, 429]
    assert [e.extra["error_class"] for e in events] == [
        "InvalidTokenError",
        "NotAllowedError",
        None,
        "RateLimitedError",
    ]
    missing, _, success, _ = events
    assert missing.project_id is None and missing.error == "missing_api_key"
    assert success.project_id == project_id and success.token_id
    assert success.request_id == ok.headers["X-Request-ID"]
    assert success.endpoint == "/v1/chat/completions" and success.method == "POST"
    assert success.usage == {
        "prompt_tokens": 11,
        "completion_tokens": 138,
        "total_tokens": 149,
        "cached_tokens": 0,
        "reasoning_tokens": 128,
    }
    assert success.extra["usage_source"] == "upstream"
    # The model that answered, as the upstream named it; the asked one beside it.
    assert success.model == "gpt-5-nano-2025-08-07" and not success.stream
    assert success.requested_model == "gpt-4o-mini"
    assert success.duration_ms > 0 and success.ttfb_ms is not None
    for event in events:
        assert token not in orjson.dumps(event.to_json_dict()).decode()


async def test_stream_without_include_usage_is_the_no_usage_stream_with_exact_usage(
    start_proxy: StartProxy, fake: FakeUpstreamState
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    response = await proxy.post(
        "/v1/chat/completions", json=STREAM, headers=bearer(token)
    )
    assert response.status == 200
    assert await response.read() == load_fixture("chat_stream_no_usage.sse")
    assert fake.requests[-1].json() == {
        **STREAM,
        "stream_options": {"include_usage": True},
    }
    event = await one_event(sub)
    assert event.stream and event.ttfb_ms is not None
    assert event.usage is not None and event.usage["total_tokens"] == 31
    assert event.extra["usage_source"] == "upstream"


async def test_stream_that_asked_for_usage_is_relayed_untouched(
    start_proxy: StartProxy, fake: FakeUpstreamState
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    body = orjson.dumps({**STREAM, "stream_options": {"include_usage": True}})
    response = await proxy.post(
        "/v1/chat/completions",
        data=body,
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    assert await response.read() == load_fixture("chat_stream_with_usage.sse")
    assert fake.requests[-1].body == body
    event = await one_event(sub)
    assert event.usage is not None and event.usage["prompt_tokens"] == 23


async def test_explicit_include_usage_false_is_honoured_and_usage_estimated(
    start_proxy: StartProxy, fake: FakeUpstreamState, tiktoken_encodings: None
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    payload = {**STREAM, "stream_options": {"include_usage": False}}
    response = await proxy.post(
        "/v1/chat/completions", json=payload, headers=bearer(token)
    )
    assert await response.read() == load_fixture("chat_stream_no_usage.sse")
    assert fake.requests[-1].json() == payload
    event = await one_event(sub)
    assert event.extra["usage_source"] == "estimated"
    assert event.usage is not None
    assert event.usage["prompt_tokens"] == 1 + 1 + 6  # "user", "hi" + framing
    assert event.usage["completion_tokens"] > 0


async def test_stream_cut_midway_gets_a_partial_estimate(
    start_proxy: StartProxy, tiktoken_encodings: None
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": "drop-mid-stream=4"}
    response = await proxy.post("/v1/chat/completions", json=STREAM, headers=headers)
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    event = await one_event(sub)
    assert event.extra["usage_source"] == "partial"
    assert event.error == "upstream_stream_interrupted"
    assert event.usage is not None and 0 < event.usage["completion_tokens"] < 8


async def test_cached_gzip_and_responses_stream_usage_are_read(
    start_proxy: StartProxy,
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    cached = {**bearer(token), "x-fake-behaviour": "usage-cached, gzip"}
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=cached)
    assert response.status == 200
    await response.read()
    stream = {"model": "gpt-4.1-nano", "input": "What is 2+2?", "stream": True}
    response = await proxy.post("/v1/responses", json=stream, headers=bearer(token))
    assert await response.read() == load_fixture("responses_stream.sse")
    gzipped, responses = await next_events(sub, 2)
    assert gzipped.usage is not None and gzipped.usage["cached_tokens"] == 1024
    assert responses.usage is not None and responses.usage["total_tokens"] == 23
    assert responses.stream


async def test_upstream_errors_are_events_with_an_error_class(
    start_proxy: StartProxy,
) -> None:
    proxy, sub = await watched(start_proxy)
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": "status-500"}
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 500
    event = await one_event(sub)
    assert event.status_code == 500 and event.usage is None
    assert event.extra["error_class"] == "UpstreamHTTPError"
    assert event.extra["usage_source"] is None


async def test_bodies_are_logged_only_when_enabled_and_bounded(
    start_proxy: StartProxy,
) -> None:
    proxy, sub = await watched(start_proxy, LOG_BODIES="true", LOG_BODY_MAX_BYTES="64")
    _, token = await proxy_token(proxy)
    body = orjson.dumps(CHAT)
    headers = {**bearer(token), "Content-Type": "application/json"}
    await proxy.post("/v1/chat/completions", data=body, headers=headers)
    event = await one_event(sub)
    assert event.extra["request_body"] == body.decode()[:64]
    assert len(event.extra["response_body"]) == 64 and event.extra["body_truncated"]
    quiet, quiet_sub = await watched(start_proxy)
    _, token = await proxy_token(quiet)
    await quiet.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert "request_body" not in (await one_event(quiet_sub)).extra


async def test_client_leaving_a_stream_is_recorded(
    start_proxy: StartProxy, fake: FakeUpstreamState
) -> None:
    proxy, sub = await watched(start_proxy)
    response = await open_stalled_stream(proxy)
    await response.content.readline()
    response.close()
    event = await one_event(sub)
    fake.gate.set()
    assert event.error == "client_disconnected" and event.status_code == 200


async def test_a_stalled_subscriber_costs_bounded_memory_under_10000_requests(
    start_proxy: StartProxy,
) -> None:
    proxy: Client = await start_proxy(
        EVENT_BUFFER_SIZE="100", EVENT_BATCH_SIZE="50", FILE_EVENT_LOG="off"
    )
    bus = proxy.app[EVENT_BUS_KEY]
    assert isinstance(bus, InMemoryEventBus)
    bus.subscribe("stalled")  # never read
    instrumentation = proxy.app[INSTRUMENTATION_KEY]
    total, peak_backlog = 10_000, 0

    async def worker(count: int) -> None:
        nonlocal peak_backlog
        for _ in range(count):
            response = await proxy.get("/v1/models")  # 401: the cheapest full chain
            assert response.status == 401
            await response.release()
            peak_backlog = max(peak_backlog, bus.stats.buffered)

    await asyncio.gather(*(worker(total // 50) for _ in range(50)))
    async with asyncio.timeout(10):
        while True:
            if instrumentation.processed + instrumentation.dropped >= total:
                break
            await asyncio.sleep(0.01)
    gc.collect()
    stats = bus.stats
    assert stats.published + instrumentation.dropped == total
    assert stats.dropped["stalled"] == stats.published - 100
    assert peak_backlog <= 2 * 100  # two subscribers, each bounded at 100


def _exchange(kind: str, body: bytes, *, head_max: int = 1 << 20) -> Exchange:
    exchange = Exchange("req-1", 0.0, "POST")
    exchange.status, exchange.path, exchange.response_kind = (
        200,
        "/v1/chat/completions",
        kind,
    )
    exchange.capture = ResponseCapture(head_max, tail_max=1024)
    exchange.capture.feed(body)
    return exchange


def test_account_usage_reads_the_tail_of_a_large_json_answer() -> None:
    body = load_fixture("chat_completion.json")
    exchange = _exchange("json", body, head_max=10)
    usage = account_usage(exchange)
    assert usage is not None and usage.total_tokens == 149
    exchange.content_encoding = "gzip"  # a compressed tail cannot be read
    assert account_usage(exchange) is None
    exchange.status = 500
    assert account_usage(exchange) is None


def test_estimate_for_a_non_streamed_answer_without_usage(
    tiktoken_encodings: None,
) -> None:
    exchange = _exchange("json", b'{"choices":[{"message":{"content":"hello"}}]}')
    exchange.request_body = b"not json"
    usage = estimate_here(exchange)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (
        0,
        1,
        "estimated",
    )
    streamed = _exchange("sse", b"", head_max=10)
    exchange.request_body = b"[]"
    assert estimate_here(streamed).total_tokens == 0


async def test_process_estimator_counts_in_a_worker_process_started_on_first_use(
    tiktoken_encodings: None,
) -> None:
    """tiktoken and its encodings live in a child process, not in the proxy."""
    exchange = _exchange("json", b'{"choices":[{"message":{"content":"hello"}}]}')
    exchange.request_body = b'{"messages":[{"role":"user","content":"hi there"}]}'
    estimator = ProcessEstimator()
    assert estimator.worker_pids() == []
    try:
        usage = await estimator(exchange)
        assert usage == estimate_here(exchange)
        assert usage.completion_tokens == 1 and usage.prompt_tokens > 0
        workers = estimator.worker_pids()
        assert len(workers) == 1 and os.getpid() not in workers
    finally:
        estimator.close()
    assert estimator.worker_pids() == []


async def test_process_estimator_recovers_from_a_killed_worker(
    tiktoken_encodings: None,
) -> None:
    exchange = _exchange("json", b'{"choices":[{"message":{"content":"hello"}}]}')
    estimator = ProcessEstimator()
    try:
        await estimator(exchange)
        os.kill(estimator.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            for _ in range(50):  # until the pool notices its worker is gone
                await estimator(exchange)
                await asyncio.sleep(0.05)
        assert (await estimator(exchange)).completion_tokens == 1  # a fresh worker
    finally:
        estimator.close()


async def test_instrumentation_drops_and_counts_when_its_queue_is_full() -> None:
    bus = InMemoryEventBus()
    instrumentation = Instrumentation(bus, EventSettings(buffer_size=2))
    for _ in range(5):
        instrumentation.submit(Exchange("r", 0.0))
    assert instrumentation.dropped == 3
    broken = Exchange("bad", 0.0)
    broken.capture = "not a capture"  # type: ignore[assignment]
    broken.status = 200
    instrumentation._queue[0] = broken
    instrumentation.close()
    await instrumentation.run()
    assert bus.stats.published == 1


async def test_a_failing_estimator_pauses_estimation_and_loses_no_event(
    start_proxy: StartProxy,
) -> None:
    proxy, sub = await watched(start_proxy, USAGE_ESTIMATION="on")
    calls: list[str] = []

    async def broken_estimator(exchange: Exchange) -> Any:
        calls.append(exchange.request_id)
        raise OSError("encodings cannot be loaded")

    proxy.app[INSTRUMENTATION_KEY].estimator = broken_estimator
    _, token = await proxy_token(proxy)
    cut = {**bearer(token), "x-fake-behaviour": "drop-mid-stream"}
    body = {**CHAT, "stream": True}
    for _ in range(2):
        response = await proxy.post("/v1/chat/completions", json=body, headers=cut)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    events = await next_events(sub, 2)
    assert [event.usage for event in events] == [None, None]
    assert len(calls) == 1, "after one failure estimation pauses"


async def test_instrumentation_gathers_calls_that_end_close_together() -> None:
    """Work starts a moment after the first call ends, so it runs once for several."""
    bus = InMemoryEventBus()
    instrumentation = Instrumentation(bus, EventSettings())
    task = asyncio.create_task(instrumentation.run())
    await asyncio.sleep(0)  # the consumer is idle, waiting for work
    try:
        for index in range(3):  # three calls ending on three turns of the loop
            instrumentation.submit(Exchange(f"r{index}", 0.0))
            await asyncio.sleep(0)
        assert instrumentation.processed == 0
        async with asyncio.timeout(2):
            while True:
                if instrumentation.processed == 3:
                    break
                await asyncio.sleep(0.001)
        assert bus.stats.published == 3
    finally:
        instrumentation.close()
        await task


ORPHAN_SCRIPT = """
import asyncio, sys, time
from llm_proxy.proxy.capture import ResponseCapture
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.accounting.instrumentation import ProcessEstimator

async def main():
    exchange = Exchange("r", 0.0)
    exchange.response_kind = "json"
    exchange.capture = ResponseCapture(1024)
    exchange.capture.feed(b'{"choices":[{"message":{"content":"hello"}}]}')
    estimator = ProcessEstimator()
    await estimator(exchange)
    print(estimator.worker_pids()[0], flush=True)
    time.sleep(60)

asyncio.run(main())
"""


def test_estimation_worker_exits_when_the_proxy_is_killed(
    tiktoken_encodings: None,
) -> None:
    """A SIGKILLed proxy leaves no tiktoken worker (and its memory) behind."""
    with subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True
    ) as proxy:
        try:
            assert proxy.stdout is not None
            worker = int(proxy.stdout.readline())
            assert process_alive(worker)
        finally:
            proxy.kill()
    deadline = time.monotonic() + 10
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker), "the worker outlived the process that started it"


class _LeaveRecorder:
    """A stage that notes that it was left."""

    def __init__(self) -> None:
        self.left = 0

    def enter(self, request: Any, exchange: Exchange) -> None:
        """Lets every call through."""

    def leave(self, request: Any, exchange: Exchange, error: Any) -> None:
        self.left += 1


class _BrokenLeave(_LeaveRecorder):
    def leave(self, request: Any, exchange: Exchange, error: Any) -> None:
        raise RuntimeError("bug in a stage")


async def test_a_stage_that_fails_to_leave_loses_neither_the_event_nor_the_others(
    aiohttp_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    from aiohttp import web

    from llm_proxy.proxy.chain import proxy_chain

    instrumentation = Instrumentation(InMemoryEventBus(), EventSettings())
    outer = _LeaveRecorder()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get(
        "/v1/x", proxy_chain(instrumentation, [outer, _BrokenLeave()], answer)
    )
    client = await aiohttp_client(app)
    response = await client.get("/v1/x")
    assert response.status == 200 and await response.json() == {"ok": True}
    assert outer.left == 1
    assert instrumentation.in_flight == 0
    assert len(instrumentation._queue) == 1  # the call's event is still on its way
    assert "_BrokenLeave" in caplog.text and "bug in a stage" in caplog.text
