"""Request framing on the way upstream: every byte the client sent, one framing, no desync.

A raw HTTP/1.1 upstream on 127.0.0.1 shows what reached the wire and on which
connection; the client side is a raw socket, so nothing frames the request for us.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import AppRunner, BaseRunner
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.events.lifecycle import EVENT_BUS_KEY

from ..support import proxy_token
from .rawhttp import RawResponse, exchange, open_raw, read_response, request_bytes

Client = TestClient[Any, Any]
CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class SeenRequest:
    """One request as the raw upstream parsed it off its connection."""

    connection: int
    request_line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawUpstream:
    """A minimal keep-alive HTTP/1.1 upstream whose misbehaviour is scripted.

    `mode`: "normal" reads the body, then answers; "answer-then-drain" answers as
    soon as the head is in, then reads the body its framing announces (a server
    that answers early); "early-413" answers 413 at once and never reads the body;
    "drop-reused" closes a connection that brings a second request, unanswered
    (a keep-alive connection that went stale as the request crossed it).
    """

    mode: str = "normal"
    requests: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    heads: int = 0  # request heads read, bodies complete or not
    closed_by_client: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection = self.connections
        self.connections += 1
        self.changed.set()
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads += 1
                line, headers = _parse_head(head)
                if self.mode == "drop-reused" and served:
                    self.requests.append(SeenRequest(connection, line, headers, b""))
                    return
                if self.mode == "early-413":
                    writer.write(_answer(413, b'{"error":"too large"}'))
                    self.requests.append(SeenRequest(connection, line, headers, b""))
                    while await reader.read(65536):
                        pass  # never parsed: the rest of the upload, if any
                    raise asyncio.IncompleteReadError(b"", None)
                if self.mode == "answer-then-drain":
                    writer.write(_answer(200, b"{}"))
                body = await _read_framed_body(reader, headers)
                self.requests.append(SeenRequest(connection, line, headers, body))
                if self.mode != "answer-then-drain":
                    writer.write(_answer(200, b"{}"))
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            self.changed.set()
            writer.close()

    async def wait_for(self, check: Callable[[RawUpstream], bool]) -> None:
        """Wait (bounded) until `check(self)` holds."""
        async with asyncio.timeout(10):
            while not check(self):
                self.changed.clear()
                await self.changed.wait()


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    line, *fields = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for item in fields:
        if item:
            name, _, value = item.partition(":")
            headers[name.strip().lower()] = value.strip()
    return line, headers


async def _read_framed_body(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return bytes(body)
    return await reader.readexactly(int(headers.get("content-length", "0")))


def _answer(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class UncancelledServer(TestServer):
    """A test server whose handlers go on when their client leaves (aiohttp's default).

    aiohttp's `TestServer` always turns handler cancellation on.
    """

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return AppRunner(self.app, **{**kwargs, "handler_cancellation": False})


async def _start(
    aiohttp_client: AiohttpClient, env: dict[str, str], cancellation: bool
) -> Client:
    app = create_app(Settings.from_env(env))
    server = TestServer(app) if cancellation else UncancelledServer(app)
    return await aiohttp_client(server)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, str]]:
    """A `RawUpstream` on a loopback port, with its base URL."""
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream, f"http://127.0.0.1:{port}"
        server.close()


async def _raw_call(
    client: Client,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> RawResponse:
    data = request_bytes(method, target, headers, body)
    return await exchange(client.server.host, client.server.port, data)


async def test_relay_forwards_the_body_of_a_get(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = [("Authorization", f"Bearer {token}"), ("Content-Length", "10")]
    answer = await _raw_call(proxy, "GET", "/v1/models", headers, b"0123456789")
    assert answer.status == 200, answer.body
    seen = fake.requests[0]
    assert (seen.body, seen.headers["Content-Length"]) == (b"0123456789", "10")


async def test_relay_body_of_a_get_never_desyncs_a_pooled_connection(
    start_proxy: Callable[..., Any], raw_upstream: tuple[RawUpstream, str]
) -> None:
    upstream, url = raw_upstream
    upstream.mode = "answer-then-drain"
    proxy = await start_proxy(OPENAI_API_URL=url)
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    first = await _raw_call(
        proxy, "GET", "/v1/models", [auth, ("Content-Length", "10")], b"0123456789"
    )
    second = await _raw_call(
        proxy,
        "POST",
        "/v1/chat/completions",
        [
            auth,
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(CHAT_BODY))),
        ],
        CHAT_BODY,
    )
    assert (first.status, second.status) == (200, 200)
    await upstream.wait_for(lambda u: len(u.requests) == 2)
    lines = [seen.request_line for seen in upstream.requests]
    assert lines == ["GET /v1/models HTTP/1.1", "POST /v1/chat/completions HTTP/1.1"]
    assert [seen.body for seen in upstream.requests] == [b"0123456789", CHAT_BODY]
    assert upstream.connections == 1  # the pooled connection was reused, in step


def _allowlist(folder: Path, *endpoints: tuple[str, str]) -> str:
    """An allowlist file of (path, "METHOD, METHOD") pairs; returns its path."""
    lines = ["apis:", "  openai:", "    allowed_endpoints:"]
    for path, methods in endpoints:
        lines += [f'      - path: "{path}"', f"        methods: [{methods}]"]
    config = folder / "apis.yaml"
    config.write_text("\n".join(lines) + "\n")
    return str(config)


async def test_relay_never_forwards_a_length_whose_body_has_not_come(
    start_proxy: Callable[..., Any], raw_upstream: tuple[RawUpstream, str]
) -> None:
    upstream, url = raw_upstream
    proxy = await start_proxy(OPENAI_API_URL=url)
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    _, stalled = await open_raw(proxy.server.host, proxy.server.port)
    try:
        stalled.write(
            request_bytes("GET", "/v1/models", [auth, ("Content-Length", "5")])
        )
        await stalled.drain()
        other = await _raw_call(proxy, "GET", "/v1/models", [auth], b"")
        assert other.status == 200
        # only the other call went upstream: the stalled one waits for its 5 bytes
        assert (upstream.heads, upstream.connections) == (1, 1)
    finally:
        stalled.close()


async def test_relay_delete_without_body_sends_an_empty_length(
    start_proxy: Callable[..., Any],
    raw_upstream: tuple[RawUpstream, str],
    tmp_path: Path,
) -> None:
    upstream, url = raw_upstream
    config = _allowlist(tmp_path, ("/v1/files/{id}", "GET, DELETE"))
    proxy = await start_proxy(OPENAI_API_URL=url, API_CONFIG_PATH=config)
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    assert (await _raw_call(proxy, "DELETE", "/v1/files/f1", [auth], b"")).status == 200
    assert (await _raw_call(proxy, "GET", "/v1/files/f1", [auth], b"")).status == 200
    deleted, got = upstream.requests
    assert deleted.headers["content-length"] == "0" and deleted.body == b""
    assert "content-length" not in got.headers
    assert "transfer-encoding" not in got.headers


async def test_relay_refuses_chunked_with_content_length(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(CHAT_BODY))),
        ("Transfer-Encoding", "chunked"),
    ]
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT_BODY), CHAT_BODY)
    answer = await _raw_call(proxy, "POST", "/v1/chat/completions", headers, chunked)
    assert answer.status == 400
    assert fake.requests == []


async def test_relay_chunked_body_goes_upstream_chunked_without_length(
    start_proxy: Callable[..., Any], raw_upstream: tuple[RawUpstream, str]
) -> None:
    upstream, url = raw_upstream
    proxy = await start_proxy(OPENAI_API_URL=url)
    _, token = await proxy_token(proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "audio/mpeg"),
        ("Transfer-Encoding", "chunked"),
    ]
    piece = b"x" * 70_000
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(20))
    answer = await _raw_call(
        proxy, "POST", "/v1/audio/transcriptions", headers, body + b"0\r\n\r\n"
    )
    assert answer.status == 200
    seen = upstream.requests[0]
    assert seen.body == piece * 20
    assert seen.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in seen.headers


async def test_relay_answers_expect_continue_once_and_strips_it(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(CHAT_BODY))),
        ("Expect", "100-continue"),
    ]
    reader, writer = await open_raw(proxy.server.host, proxy.server.port)
    try:
        writer.write(request_bytes("POST", "/v1/chat/completions", headers))
        interim = await read_response(reader)
        assert interim.status == 100
        writer.write(CHAT_BODY)
        final = await read_response(reader)
    finally:
        writer.close()
    assert final.status == 200, final.body
    seen = fake.requests[0]
    assert seen.body == CHAT_BODY and "Expect" not in seen.headers


async def test_relay_passes_an_early_upstream_413_and_drops_that_connection(
    start_proxy: Callable[..., Any], raw_upstream: tuple[RawUpstream, str]
) -> None:
    upstream, url = raw_upstream
    upstream.mode = "early-413"
    proxy = await start_proxy(OPENAI_API_URL=url)
    _, token = await proxy_token(proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "audio/mpeg"),
        ("Content-Length", str(8 * 1024 * 1024)),
    ]
    reader, writer = await open_raw(proxy.server.host, proxy.server.port)
    try:
        writer.write(request_bytes("POST", "/v1/audio/transcriptions", headers))
        writer.write(b"x" * (2 * 1024 * 1024))  # the upload is under way, far from done
        answer = await read_response(reader)
    finally:
        writer.close()
    assert (answer.status, answer.body) == (413, b'{"error":"too large"}')
    # the connection whose request body was cut short is closed, never pooled
    await upstream.wait_for(lambda u: u.closed_by_client == 1)
    second = await _raw_call(
        proxy, "GET", "/v1/models", [("Authorization", f"Bearer {token}")], b""
    )
    assert second.status == 413
    assert upstream.connections == 2


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_relay_never_replays_a_streamed_body_on_a_stale_connection(
    start_proxy: Callable[..., Any],
    raw_upstream: tuple[RawUpstream, str],
    tmp_path: Path,
    method: str,
) -> None:
    upstream, url = raw_upstream
    upstream.mode = "drop-reused"
    config = _allowlist(
        tmp_path, ("/v1/models", "GET"), ("/v1/audio/transcriptions", method)
    )
    proxy = await start_proxy(OPENAI_API_URL=url, API_CONFIG_PATH=config)
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    assert (await _raw_call(proxy, "GET", "/v1/models", [auth], b"")).status == 200
    upload = b"y" * (3 * 1024 * 1024)
    headers = [
        auth,
        ("Content-Type", "audio/mpeg"),
        ("Content-Length", str(len(upload))),
    ]
    answer = await _raw_call(proxy, method, "/v1/audio/transcriptions", headers, upload)
    assert answer.status in (200, 502), answer.body
    # a retry, if any, carried the whole body: never a truncated or empty replay
    posts = [seen for seen in upstream.requests if seen.request_line.startswith(method)]
    assert all(seen.body in (b"", upload) for seen in posts)
    replayed = [seen for seen in posts if seen.body]
    assert (answer.status == 200) == bool(replayed)


@pytest.mark.parametrize("cancellation", [True, False])
@pytest.mark.parametrize("length", [str(8 * 1024 * 1024), None])
async def test_relay_client_abort_mid_upload_is_not_an_upstream_failure(
    aiohttp_client: AiohttpClient,
    proxy_env: dict[str, str],
    raw_upstream: tuple[RawUpstream, str],
    length: str | None,
    cancellation: bool,
) -> None:
    upstream, url = raw_upstream
    env = {**proxy_env, "OPENAI_API_URL": url, "BREAKER_FAILURE_THRESHOLD": "1"}
    proxy = await _start(aiohttp_client, env, cancellation)
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    framing = ("Content-Length", length) if length else ("Transfer-Encoding", "chunked")
    headers = [auth, ("Content-Type", "audio/mpeg"), framing]
    piece = b"u" * 65536
    chunk = piece if length else b"%x\r\n%s\r\n" % (len(piece), piece)
    _, writer = await open_raw(proxy.server.host, proxy.server.port)
    writer.write(request_bytes("POST", "/v1/audio/transcriptions", headers))
    for _ in range(32):  # 2 MiB of the upload, then the client is gone
        writer.write(chunk)
        await writer.drain()
    await upstream.wait_for(lambda u: u.connections == 1)
    writer.transport.abort()
    # the upstream request is abandoned with its connection, never completed
    await upstream.wait_for(lambda u: u.closed_by_client == 1)
    assert upstream.requests == []
    answer = await _raw_call(proxy, "GET", "/v1/models", [auth], b"")
    assert answer.status == 200, answer.body  # the breaker did not count it


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/v1/chat/completions", "application/json"), ("/v1/audio/transcriptions", "")],
)
async def test_relay_malformed_chunked_body_never_completes_upstream(
    start_proxy: Callable[..., Any],
    raw_upstream: tuple[RawUpstream, str],
    path: str,
    content_type: str,
) -> None:
    # aiohttp's parser drops a payload whose chunk framing breaks mid-body without
    # failing it, so the call waits for the client to leave (or a body timeout).
    upstream, url = raw_upstream
    proxy = await start_proxy(OPENAI_API_URL=url, BREAKER_FAILURE_THRESHOLD="1")
    _, token = await proxy_token(proxy)
    auth = ("Authorization", f"Bearer {token}")
    headers = [auth, ("Transfer-Encoding", "chunked")]
    if content_type:
        headers.append(("Content-Type", content_type))
    piece = b"v" * 65536
    body = b"%x\r\n%s\r\n" % (len(piece), piece) * 20 + b"zz\r\nnot a chunk\r\n"
    _, writer = await open_raw(proxy.server.host, proxy.server.port)
    writer.write(request_bytes("POST", path, headers, body))
    await writer.drain()
    writer.transport.abort()
    await upstream.wait_for(lambda u: u.closed_by_client == u.connections)
    assert upstream.requests == []
    models = await _raw_call(proxy, "GET", "/v1/models", [auth], b"")
    assert models.status == 200, models.body  # the breaker did not count it


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/audio/transcriptions"])
async def test_relay_records_a_body_cut_by_the_client_as_its_error(
    aiohttp_client: AiohttpClient,
    proxy_env: dict[str, str],
    raw_upstream: tuple[RawUpstream, str],
    path: str,
) -> None:
    upstream, url = raw_upstream
    env = {**proxy_env, "OPENAI_API_URL": url, "EVENT_FLUSH_INTERVAL": "0.01"}
    proxy = await _start(aiohttp_client, env, False)  # the read itself fails
    events = proxy.app[EVENT_BUS_KEY].subscribe("test")
    _, token = await proxy_token(proxy)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(4 * 1024 * 1024)),
    ]
    _, writer = await open_raw(proxy.server.host, proxy.server.port)
    writer.write(request_bytes("POST", path, headers, b"[" * (2 * 1024 * 1024)))
    await writer.drain()
    writer.transport.abort()
    async with asyncio.timeout(10):
        [event] = await anext(events)
    assert (event.status_code, event.error) == (400, "incomplete_request_body")
    assert upstream.requests == []
