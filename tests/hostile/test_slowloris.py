"""Slow and oversized request heads, and too many connections, on raw sockets.

The proxy runs behind `listener.py` exactly as `serve()` starts it; every client here
is a raw TCP socket, so the bytes sent and the bytes (or the close) seen are exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import ConfigError, ListenerSettings, Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.listener import (
    KEEPALIVE_TIMEOUT_S,
    RESERVED_FDS,
    UNLIMITED_FILES,
    GuardedRequestHandler,
    ListenerRunner,
    raise_open_files_limit,
    resolve_listener,
)

from ..support import bearer, proxy_token
from .listening import ListenerTestServer
from .rawhttp import exchange, open_raw, read_response, request_bytes

HEADER_TIMEOUT_S = 0.5
StartGuarded = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def start_guarded(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str]
) -> StartGuarded:
    """Start the proxy (in front of the fake upstream) behind the listener limits."""

    async def start(**limits: Any) -> TestClient[Any, Any]:
        settings = Settings.from_env(proxy_env)
        listener = ListenerSettings(
            **{"header_timeout_s": HEADER_TIMEOUT_S, "max_connections": 100, **limits}
        )
        server = ListenerTestServer(create_app(settings), listener)
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return start


def _address(client: TestClient[Any, Any]) -> tuple[str, int]:
    server = client.server
    assert server.port is not None
    return server.host, server.port


async def _closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bool:
    """True once the server closed the connection (EOF or reset) within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await reader.read(65536) == b""
    except ConnectionResetError:
        return True


async def _eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `condition()` holds (checked every 10 ms), failing after `timeout_s`."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


HEALTH = request_bytes("GET", "/health")


async def test_partial_header_gets_408_and_is_closed_after_the_header_timeout(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded()
    reader, writer = await open_raw(*_address(client))
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    answer = await read_response(reader, timeout_s=5.0)
    waited = time.monotonic() - started
    assert answer.status == 408
    assert answer.header("connection") == "close"
    error = json.loads(answer.body)["error"]
    assert error["code"] == "request_header_timeout"
    assert waited >= HEADER_TIMEOUT_S * 0.9
    assert await _closed(reader)
    writer.close()


async def test_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded()
    reader, writer = await open_raw(*_address(client))
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await reader.read(100) == b""  # closed, no 408 for a silent peer
    assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    writer.close()


async def test_trickled_header_bytes_do_not_extend_the_deadline(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded()
    reader, writer = await open_raw(*_address(client))
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    trickle_s = 0.05  # 100 bytes take 5 s, ten header timeouts
    started = time.monotonic()
    response = asyncio.ensure_future(read_response(reader, timeout_s=10.0))
    for byte in head:
        if response.done():
            break
        try:
            writer.write(bytes([byte]))
        except ConnectionError:  # pragma: no cover - the close raced our write
            break
        await asyncio.sleep(trickle_s)
    answer = await response
    assert answer.status == 408
    # Cut at the deadline, long before the trickle would have finished.
    assert time.monotonic() - started < len(head) * trickle_s / 2
    writer.close()


async def test_keep_alive_connection_gets_a_fresh_deadline_per_request(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded()
    reader, writer = await open_raw(*_address(client))
    writer.write(HEALTH)
    assert (await read_response(reader)).status == 200
    # Idle for three header timeouts: the deadline of the first head is long gone,
    # and idle time between requests is the keep-alive timer's business.
    await asyncio.sleep(HEADER_TIMEOUT_S * 3)
    writer.write(HEALTH)
    assert (await read_response(reader)).status == 200
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\n")  # the next head starts, then stalls
    answer = await read_response(reader, timeout_s=5.0)
    assert answer.status == 408
    assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9
    writer.close()


async def test_response_in_progress_is_not_cut_by_a_pipelined_slow_head(
    start_guarded: StartGuarded, fake: FakeUpstreamState
) -> None:
    client = await start_guarded()
    _, token = await proxy_token(client)
    body = json.dumps(
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user"}]}
    ).encode()
    headers = [
        *bearer(token).items(),
        ("x-fake-behaviour", "stall-after-first-event"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    reader, writer = await open_raw(*_address(client))
    writer.write(request_bytes("POST", "/v1/chat/completions", headers, body))
    await fake.wait_for(lambda state: state.stalled == 1)
    writer.write(b"GET /health HTTP/1.1\r\n")  # pipelined behind it, incomplete
    await asyncio.sleep(HEADER_TIMEOUT_S * 2)  # the stream is still being answered
    fake.release()
    answer = await read_response(reader)
    assert answer.status == 200 and answer.body.rstrip().endswith(b"data: [DONE]")
    late = await read_response(reader, timeout_s=5.0)  # then the slow head's turn
    assert late.status == 408
    writer.close()


async def test_oversized_header_block_gets_431_and_never_reaches_upstream(
    start_guarded: StartGuarded, fake: FakeUpstreamState
) -> None:
    client = await start_guarded(max_header_bytes=16 * 1024)
    _, token = await proxy_token(client)
    body = b'{"model": "gpt-4o-mini", "input": "hi"}'
    common = [
        *bearer(token).items(),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    small = [(f"X-Pad-{i}", "p" * 1000) for i in range(14)]  # about 14 KB: allowed
    accepted = await exchange(
        *_address(client),
        request_bytes("POST", "/v1/embeddings", common + small, body),
    )
    assert accepted.status == 200, accepted.body
    assert len(fake.requests) == 1
    big = [(f"X-Pad-{i}", "p" * 1000) for i in range(20)]  # about 20 KB, one write
    refused = await exchange(
        *_address(client), request_bytes("POST", "/v1/embeddings", common + big, body)
    )
    assert refused.status == 431
    assert refused.header("connection") == "close"
    assert json.loads(refused.body)["error"]["code"] == "request_header_too_large"
    assert len(fake.requests) == 1


async def test_header_block_growing_past_the_cap_gets_431_before_it_ends(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded(max_header_bytes=4096, header_timeout_s=30.0)
    reader, writer = await open_raw(*_address(client))
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    response = asyncio.ensure_future(read_response(reader, timeout_s=5.0))
    sent = 0
    while not response.done() and sent < 100:  # 1 KB writes, the head never ends
        writer.write(f"X-Pad-{sent}: {'p' * 1000}\r\n".encode())
        sent += 1
        await asyncio.sleep(0.02)
    answer = await response  # at the cap, not at the 30 s deadline
    assert 4 <= sent < 100
    assert answer.status == 431
    assert await _closed(reader)
    writer.close()


async def test_upload_body_is_not_counted_as_header(
    start_guarded: StartGuarded, fake: FakeUpstreamState
) -> None:
    client = await start_guarded(max_header_bytes=4096)
    _, token = await proxy_token(client)
    body = json.dumps({"model": "gpt-4o-mini", "input": "x" * 200_000}).encode()
    headers = [
        *bearer(token).items(),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]
    head = request_bytes("POST", "/v1/embeddings", headers)
    reader, writer = await open_raw(*_address(client))
    writer.write(head)
    for start in range(0, len(body), 8192):
        writer.write(body[start : start + 8192])
        await writer.drain()
    answer = await read_response(reader)
    assert answer.status == 200
    assert fake.requests[-1].body == body
    writer.write(HEALTH)  # the same connection serves the next request
    assert (await read_response(reader)).status == 200
    writer.close()


async def test_connections_beyond_the_cap_get_503_while_existing_ones_are_served(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded(max_connections=3, header_timeout_s=30.0)
    address = _address(client)
    held = [await open_raw(*address) for _ in range(3)]
    for reader, writer in held:
        writer.write(HEALTH)
        assert (await read_response(reader)).status == 200
    reader, writer = await open_raw(*address)
    refused = await read_response(reader, timeout_s=5.0)
    assert refused.status == 503 and refused.header("retry-after") == "1"
    assert json.loads(refused.body)["error"]["code"] == "too_many_connections"
    assert await _closed(reader)
    writer.close()
    for reader, writer in held:  # still served
        writer.write(HEALTH)
        assert (await read_response(reader)).status == 200
    server = client.server
    assert isinstance(server, ListenerTestServer)
    assert server.listener_server.refused_connections == 1
    held[0][1].close()
    # Its place frees up once the server sees the close.
    await _eventually(lambda: server.listener_server.open_connections == 2)
    again = await exchange(*address, HEALTH)
    assert again.status == 200
    for _, other in held[1:]:
        other.close()


async def test_refused_client_that_sent_its_request_still_reads_the_503(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded(max_connections=1, header_timeout_s=30.0)
    address = _address(client)
    reader, writer = await open_raw(*address)
    writer.write(HEALTH)
    assert (await read_response(reader)).status == 200
    refused = await exchange(*address, HEALTH)  # request written before any read
    assert refused.status == 503
    writer.close()


async def test_effective_limits_are_the_configured_ones(
    start_guarded: StartGuarded,
) -> None:
    client = await start_guarded(
        header_timeout_s=7.0, max_connections=42, max_header_bytes=5000
    )
    reader, writer = await open_raw(*_address(client))
    writer.write(HEALTH)
    assert (await read_response(reader)).status == 200
    server = client.server
    assert isinstance(server, ListenerTestServer)
    low = server.listener_server
    assert low.max_connections == 42 and low.handler_cancellation is True
    [protocol] = low.connections
    assert isinstance(protocol, GuardedRequestHandler)
    assert (protocol.header_timeout_s, protocol.max_header_bytes) == (7.0, 5000)
    assert protocol.keepalive_timeout == KEEPALIVE_TIMEOUT_S
    assert (protocol.max_line_size, protocol.max_field_size) == (8190, 8190)
    assert protocol.max_headers == 128
    writer.close()


async def test_misspelt_handler_setting_fails_at_start_instead_of_reverting() -> None:
    runner = ListenerRunner(
        web.Application(),
        ListenerSettings(max_connections=10),
        keepalive_timout=5,  # misspelt on purpose
    )
    with pytest.raises(TypeError, match="keepalive_timout"):
        await runner.setup()
    await runner.cleanup()


def test_auto_cap_leaves_room_for_pools_and_files(settings: Settings) -> None:
    resolved = resolve_listener(settings, 20_000)
    pooled = settings.upstream.max_connections + settings.db_pool_max_size
    assert resolved.max_connections == 20_000 - pooled - RESERVED_FDS
    assert resolved.header_timeout_s == settings.listener.header_timeout_s


def test_auto_cap_without_room_fails_at_start_naming_the_settings(
    settings: Settings,
) -> None:
    with pytest.raises(ConfigError, match="MAX_CLIENT_CONNECTIONS=auto.*ulimit"):
        resolve_listener(settings, 1024)


def test_explicit_cap_above_the_fd_budget_is_kept_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    explicit = replace(settings, listener=ListenerSettings(max_connections=5000))
    with caplog.at_level(logging.WARNING, logger="llm_proxy.listener"):
        resolved = resolve_listener(explicit, 2048)
    assert resolved.max_connections == 5000
    assert "MAX_CLIENT_CONNECTIONS=5000 exceeds" in caplog.text


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        expected = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
        assert raise_open_files_limit() == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_upgraded_connection_is_not_under_the_header_deadline(
    aiohttp_client: AiohttpClient,
) -> None:
    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", websocket)
    listener = ListenerSettings(header_timeout_s=HEADER_TIMEOUT_S, max_connections=10)
    client = await aiohttp_client(ListenerTestServer(app, listener))
    async with client.ws_connect("/ws") as ws:
        for _ in range(3):  # frames well past the header deadline
            await asyncio.sleep(HEADER_TIMEOUT_S)
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=5) == "ping"
