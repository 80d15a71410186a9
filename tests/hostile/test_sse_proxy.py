"""End to end: an upstream framing SSE its own way, a client that did not ask for usage.

The proxy injects `include_usage` upstream; whatever the framing, the client must
get every content byte in upstream's framing, no usage chunk, and the call's event
the exact usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI

from llm_proxy.devtools.fake_upstream import BEHAVIOUR_HEADER, FakeUpstreamState
from llm_proxy.events.lifecycle import EVENT_BUS_KEY
from llm_proxy.events.model import RequestCompleted, Subscription

from ..support import bearer, proxy_token
from .test_sse_stripper import Variant, client_events, delivered_text

Client = TestClient[Any, Any]
STREAM = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "What is 10 + 5?"}],
    "stream": True,
}
# (behaviour header, the same framing as a test_sse_stripper variant)
FRAMINGS: list[tuple[str, Variant]] = [
    ("sse-framing=crlf", ("crlf", False, True, False)),
    ("sse-framing=cr", ("cr", False, True, False)),
    ("sse-framing=mixed, sse-keepalive", ("mixed", False, True, True)),
    ("sse-framing=crlf, sse-spaced-json, sse-keepalive", ("crlf", True, True, True)),
    ("sse-no-blank-lines", ("lf", False, False, False)),
    ("sse-framing=crlf, sse-no-blank-lines", ("crlf", False, False, False)),
]


async def one_event(sub: Subscription) -> RequestCompleted:
    events: list[RequestCompleted] = []
    async with asyncio.timeout(5):
        while not events:
            events += await anext(sub)
    [event] = events
    return event


@pytest.mark.parametrize(
    ("behaviour", "variant"), FRAMINGS, ids=[f[0] for f in FRAMINGS]
)
async def test_a_client_gets_every_content_byte_and_no_usage_chunk(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    behaviour: str,
    variant: Variant,
) -> None:
    proxy: Client = await start_proxy(EVENT_FLUSH_INTERVAL="0.01")
    sub = proxy.app[EVENT_BUS_KEY].subscribe("test")
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), BEHAVIOUR_HEADER: behaviour}
    response = await proxy.post("/v1/chat/completions", json=STREAM, headers=headers)
    assert response.status == 200
    body = await response.read()
    assert body == b"".join(client_events(variant))
    assert delivered_text(body) == "10 + 5 equals 15."
    assert b"usage" not in body
    assert fake.requests[-1].json()["stream_options"] == {"include_usage": True}
    event = await one_event(sub)
    assert event.usage is not None and event.usage["total_tokens"] == 31
    assert event.extra["usage_source"] == "upstream"


async def test_the_openai_sdk_reads_a_crlf_stream_without_a_usage_chunk(
    start_proxy: Callable[..., Any],
) -> None:
    proxy: Client = await start_proxy()
    _, token = await proxy_token(proxy)
    client = AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key=token, max_retries=0
    )
    async with client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=STREAM["messages"],  # type: ignore[arg-type]
            stream=True,
            extra_headers={BEHAVIOUR_HEADER: "sse-framing=crlf, sse-spaced-json"},
        )
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == 10
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "10 + 5 equals 15."


@pytest.mark.parametrize(
    ("behaviour", "variant"),
    [FRAMINGS[0], FRAMINGS[1], FRAMINGS[5]],
    ids=["crlf", "cr", "crlf-no-blank-lines"],
)
async def test_the_first_event_arrives_while_upstream_holds_the_rest(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    behaviour: str,
    variant: Variant,
) -> None:
    proxy: Client = await start_proxy()
    _, token = await proxy_token(proxy)
    headers = {
        **bearer(token),
        BEHAVIOUR_HEADER: behaviour + ", stall-after-first-event",
    }
    response = await proxy.post("/v1/chat/completions", json=STREAM, headers=headers)
    first, *rest = client_events(variant)
    try:
        async with asyncio.timeout(5):
            assert await response.content.readexactly(len(first)) == first
        assert fake.stalled == 1  # the rest is still upstream
    finally:
        fake.release()  # a failure must not leave the stream stalled
    assert await response.read() == b"".join(rest)
