"""The raw-socket client reads what a real aiohttp server frames."""

from __future__ import annotations

from aiohttp import web
from pytest_aiohttp import AiohttpServer

from .rawhttp import exchange, request_bytes


async def test_raw_client_reads_length_and_chunked_bodies(
    aiohttp_server: AiohttpServer,
) -> None:
    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=b"hello", headers={"X-Seen": request.method})

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"ab", b"cde"):
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/fixed", fixed)
    app.router.add_get("/chunked", chunked)
    server = await aiohttp_server(app)
    answer = await exchange(server.host, server.port, request_bytes("GET", "/fixed"))
    assert (answer.status, answer.body, answer.header("x-seen")) == (
        200,
        b"hello",
        "GET",
    )
    answer = await exchange(server.host, server.port, request_bytes("GET", "/chunked"))
    assert answer.body == b"abcde"
    assert answer.raw_body == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
