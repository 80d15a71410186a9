"""MAX_REQUEST_BYTES on every body, and usage accounting that no body shape evades."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.devtools.fake_upstream import FakeUpstreamState, load_fixture
from llm_proxy.events.lifecycle import EVENT_BUS_KEY
from llm_proxy.events.model import RequestCompleted, Subscription

from ..support import bearer, proxy_token
from .rawhttp import exchange, open_raw, read_response, request_bytes

Client = TestClient[Any, Any]
LIMIT = 2 * 1024 * 1024
STREAM = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}


def _error_code(body: bytes) -> str:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    code: str = error["code"]
    return code


async def _limited(start_proxy: Callable[..., Any]) -> tuple[Client, str]:
    proxy: Client = await start_proxy(MAX_REQUEST_BYTES=str(LIMIT))
    _, token = await proxy_token(proxy)
    return proxy, token


def _big_chat() -> bytes:
    return orjson.dumps(
        {**STREAM, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    )


async def _in_pieces(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 65536):
        yield data[start : start + 65536]


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_limit_refuses_a_large_json_body(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, framing: str
) -> None:
    proxy, token = await _limited(start_proxy)
    body = _big_chat()
    data = io.BytesIO(body) if framing == "length" else _in_pieces(body)
    headers = {**bearer(token), "Content-Type": "application/json"}
    response = await proxy.post("/v1/chat/completions", data=data, headers=headers)
    assert response.status == 413
    assert _error_code(await response.read()) == "request_too_large"
    assert fake.requests_seen == 0


async def test_limit_refuses_a_declared_length_before_reading_or_connecting(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy, token = await _limited(start_proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "audio/mpeg"),
        ("Content-Length", str(10**12)),
    ]
    head = request_bytes("POST", "/v1/audio/transcriptions", headers)
    answer = await exchange(proxy.server.host, proxy.server.port, head + b"xyz")
    assert answer.status == 413
    assert _error_code(answer.body) == "request_too_large"
    assert answer.header("Connection") == "close"
    assert fake.requests_seen == 0


async def test_limit_cuts_a_chunked_upload_as_soon_as_it_is_crossed(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy, token = await _limited(start_proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "multipart/form-data; boundary=b"),
        ("Transfer-Encoding", "chunked"),
    ]
    reader, writer = await open_raw(proxy.server.host, proxy.server.port)
    piece = b"z" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    try:
        writer.write(request_bytes("POST", "/v1/audio/transcriptions", headers))
        answer_task = asyncio.ensure_future(read_response(reader))
        sent = 0
        while not answer_task.done() and sent < 64 * LIMIT:  # never the final chunk
            writer.write(chunk)
            sent += len(piece)
            await writer.drain()
        answer = await answer_task
    finally:
        writer.close()
    assert answer.status == 413
    assert _error_code(answer.body) == "request_too_large"
    assert sent < 8 * LIMIT  # refused while the upload went on, not at its end
    assert all(seen.body_size <= LIMIT for seen in fake.requests)


async def test_limit_lets_a_body_of_exactly_the_limit_through(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy, token = await _limited(start_proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "audio/mpeg"),
        ("Transfer-Encoding", "chunked"),
    ]
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (LIMIT, b"a" * LIMIT)
    data = request_bytes("POST", "/v1/audio/transcriptions", headers, body)
    answer = await exchange(proxy.server.host, proxy.server.port, data)
    assert answer.status == 200, answer.body
    assert fake.requests[0].body_size == LIMIT


async def _events(proxy: Client) -> Subscription:
    return proxy.app[EVENT_BUS_KEY].subscribe("test")


async def _one_event(sub: Subscription) -> RequestCompleted:
    async with asyncio.timeout(5):
        events = await anext(sub)
    return events[0]


@pytest.mark.parametrize(
    ("content_type", "padding"),
    [
        ("application/json", 2 << 20),  # past the 1 MiB a small body is read at once
        ("text/plain", 0),
        (None, 0),
        ("application/x-www-form-urlencoded", 1 << 20),
    ],
)
async def test_accounting_peeks_any_streamed_chat_body(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    content_type: str | None,
    padding: int,
) -> None:
    proxy: Client = await start_proxy(EVENT_FLUSH_INTERVAL="0.01")
    sub = await _events(proxy)
    _, token = await proxy_token(proxy)
    body = orjson.dumps(STREAM) + b" " * padding
    headers = [("Authorization", f"Bearer {token}")]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(len(body))))
    data = request_bytes("POST", "/v1/chat/completions", headers, body)
    answer = await exchange(proxy.server.host, proxy.server.port, data)
    assert answer.body == load_fixture("chat_stream_no_usage.sse")
    sent = fake.requests[0].json()
    assert sent["stream_options"] == {"include_usage": True}
    event = await _one_event(sub)
    assert event.requested_model == "gpt-4o-mini" and event.stream
    assert event.usage is not None and event.usage["prompt_tokens"] > 0
    assert event.extra["usage_source"] == "upstream"


async def test_limit_refusals_give_the_rate_limit_slot_back(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy: Client = await start_proxy(MAX_REQUEST_BYTES=str(LIMIT))
    _, token = await proxy_token(proxy, rate_limit_per_hour=1)
    headers = {**bearer(token), "Content-Type": "application/json"}
    refused = await proxy.post(
        "/v1/chat/completions", data=_in_pieces(_big_chat()), headers=headers
    )
    assert refused.status == 413
    served = await proxy.get("/v1/models", headers=bearer(token))
    assert served.status == 200, await served.text()
    limited = await proxy.get("/v1/models", headers=bearer(token))
    assert limited.status == 429
    assert fake.requests_seen == 1
