"""Pipelined requests on one connection: every answer, in order, none mixed up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..support import proxy_token
from .rawhttp import open_raw, read_response, request_bytes

CHAT = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
)


async def test_pipelined_requests_get_their_own_answers_in_order(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy()
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    requests = []
    for n in range(40):
        if n % 2:
            headers = [
                auth,
                ("X-Request-ID", f"pipe-{n}"),
                ("Content-Type", "application/json"),
            ]
            headers.append(("Content-Length", str(len(CHAT))))
            requests.append(
                request_bytes("POST", "/v1/chat/completions", headers, CHAT)
            )
        else:
            headers = [auth, ("X-Request-ID", f"pipe-{n}")]
            requests.append(request_bytes("GET", "/v1/models", headers))
    reader, writer = await open_raw(proxy.server.host, proxy.server.port)
    try:
        writer.write(b"".join(requests))  # all of them in one write
        await writer.drain()
        for n in range(40):
            answer = await read_response(reader, timeout_s=20)
            assert answer.status == 200, answer.body[:200]
            assert answer.header("x-request-id") == f"pipe-{n}"
            body = orjson.loads(answer.body)
            assert body["object"] == ("chat.completion" if n % 2 else "list")
    finally:
        writer.close()


async def test_a_flood_of_pipelined_requests_is_answered_with_back_pressure(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy()
    _, token = await proxy_token(proxy)
    count = 300
    one = request_bytes("GET", "/v1/models", [("Authorization", f"Bearer {token}")])
    reader, writer = await open_raw(proxy.server.host, proxy.server.port)
    try:
        writer.write(one * count)
        await writer.drain()
        statuses = [
            (await read_response(reader, timeout_s=30)).status for _ in range(count)
        ]
    finally:
        writer.close()
    assert statuses == [200] * count
