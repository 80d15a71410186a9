"""The proxy chain end to end: real app, real fake upstream, real sockets."""

from __future__ import annotations

import asyncio
import gzip
import io
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.devtools.fake_upstream import FakeUpstreamState, load_fixture
from llm_proxy.keys import TOKEN_STORE_KEY
from llm_proxy.proxy.headers import client_address, media_type

from ..support import AUTH, UPSTREAM_KEY, bearer, open_stalled_stream, proxy_token

Client = TestClient[Any, Any]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_proxy_forwards_chat_byte_for_byte_with_project_key(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = {
        **bearer(token),
        "OpenAI-Organization": "org-evil",
        "OpenAI-Project": "proj-evil",
        "Cookie": "session=1",
        "X-Forwarded-For": "10.1.2.3",
    }
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 200
    assert await response.read() == load_fixture("chat_completion.json")
    [seen] = fake.requests
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert token not in str(dict(seen.headers))
    for dropped in (
        "OpenAI-Organization",
        "OpenAI-Project",
        "Cookie",
        "X-Forwarded-For",
    ):
        assert dropped not in seen.headers
    assert seen.json() == CHAT
    assert response.headers["X-Request-ID"] == seen.headers["X-Request-ID"]
    assert response.headers["x-ratelimit-limit-requests"] == "1000"
    assert response.headers["x-ratelimit-remaining-requests"] == "999"
    assert response.headers["x-ratelimit-limit-tokens"] == "150000000"


async def test_proxy_adds_no_default_headers_of_its_http_client(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    bare = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
    body = orjson.dumps(CHAT)
    response = await proxy.post(
        "/v1/chat/completions",
        data=body,
        headers=bearer(token),
        skip_auto_headers=bare,
    )
    assert response.status == 200, await response.text()
    sent = {
        "User-Agent": "my-sdk/1.0",
        "Accept": "application/json",
        "Accept-Encoding": "br",
        "Content-Type": "application/json",
    }
    response = await proxy.post(
        "/v1/chat/completions", data=body, headers={**bearer(token), **sent}
    )
    assert response.status == 200, await response.text()
    first, second = fake.requests
    for name in bare:
        assert name not in first.headers, name
    assert {name: second.headers[name] for name in sent} == sent


async def test_proxy_keeps_a_sane_client_request_id(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "X-Request-ID": "client-req-42"}
    response = await proxy.get("/v1/models", headers=headers)
    assert response.headers["X-Request-ID"] == "client-req-42"
    assert fake.requests[0].headers["X-Request-ID"] == "client-req-42"
    insane = {**bearer(token), "X-Request-ID": "bad id\twith junk" + "x" * 200}
    response = await proxy.get("/v1/models", headers=insane)
    assert response.headers["X-Request-ID"] != insane["X-Request-ID"]


async def test_proxy_streams_first_event_before_upstream_finishes(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    response = await open_stalled_stream(proxy)
    assert response.status == 200
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Content-Type"].startswith("text/event-stream")
    async with asyncio.timeout(2):
        first = await response.content.readuntil(b"\n\n")
    assert first.startswith(b"data: {")
    assert fake.stalled == 1, "upstream is still holding the rest of the stream"
    fake.release()
    rest = await response.read()
    assert first + rest == load_fixture("chat_stream_no_usage.sse")


async def test_proxy_drops_upstream_set_cookie(proxy: Client) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": "set-cookie"}
    response = await proxy.get("/v1/models", headers=headers)
    assert response.status == 200
    assert "Set-Cookie" not in response.headers


async def test_proxy_passes_compressed_bytes_through(proxy: Client) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": "gzip", "Accept-Encoding": "gzip"}
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT, headers=headers, auto_decompress=False
    )
    assert response.headers["Content-Encoding"] == "gzip"
    raw = await response.read()
    assert gzip.decompress(raw) == load_fixture("chat_completion.json")


@pytest.mark.parametrize("status", [429, 500, 401])
async def test_proxy_passes_upstream_errors_unchanged(
    proxy: Client, status: int
) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": f"status-{status}"}
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == status
    body = await response.json()
    assert "error" in body
    if status == 429:
        assert response.headers["retry-after"] == "4"
        assert response.headers["x-ratelimit-remaining-tokens"] == "1961"


async def test_proxy_refuses_missing_and_unknown_tokens(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    error = await error_of(await proxy.get("/v1/models"), 401)
    assert error["code"] == "missing_api_key"
    wrong = await proxy.get("/v1/models", headers=bearer("wt-not-a-real-token"))
    assert (await error_of(wrong, 401))["code"] == "invalid_api_key"
    basic = await proxy.get("/v1/models", headers={"Authorization": "Basic abc"})
    await error_of(basic, 401)
    assert fake.requests == []


async def test_proxy_refuses_revoked_token_on_next_request(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200
    revoke = await proxy.delete("/manage/tokens", json={"token": token}, headers=AUTH)
    assert revoke.status == 204
    await error_of(await proxy.get("/v1/models", headers=bearer(token)), 401)
    assert len(fake.requests) == 1


async def test_proxy_refuses_expired_token(proxy: Client) -> None:
    _, token = await proxy_token(proxy)
    store = proxy.app[TOKEN_STORE_KEY]
    store.clock = lambda: time.time() + 2 * 3600
    error = await error_of(await proxy.get("/v1/models", headers=bearer(token)), 401)
    assert error["code"] == "token_expired"


async def test_proxy_refuses_tokens_of_inactive_project_then_allows_again(
    proxy: Client,
) -> None:
    project_id, token = await proxy_token(proxy)
    await proxy.patch(
        f"/manage/projects/{project_id}", json={"is_active": False}, headers=AUTH
    )
    error = await error_of(await proxy.get("/v1/models", headers=bearer(token)), 403)
    assert error["code"] == "project_inactive"
    await proxy.patch(
        f"/manage/projects/{project_id}", json={"is_active": True}, headers=AUTH
    )
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200


async def test_proxy_uses_rotated_key_on_next_request(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    project_id, token = await proxy_token(proxy)
    await proxy.get("/v1/models", headers=bearer(token))
    rotated = "sk-proj-ROTATED-0123456789abcdefgh"
    await proxy.patch(
        f"/manage/projects/{project_id}", json={"openai_api_key": rotated}, headers=AUTH
    )
    await proxy.get("/v1/models", headers=bearer(token))
    assert fake.requests[1].headers["Authorization"] == f"Bearer {rotated}"


async def test_proxy_deleted_project_tokens_stop_working(proxy: Client) -> None:
    project_id, token = await proxy_token(proxy)
    await proxy.delete(f"/manage/projects/{project_id}", headers=AUTH)
    await error_of(await proxy.get("/v1/models", headers=bearer(token)), 401)


async def test_proxy_bulk_revoke_stops_all_tokens(proxy: Client) -> None:
    project_id, token = await proxy_token(proxy)
    await proxy.post(f"/manage/projects/{project_id}/tokens/revoke", headers=AUTH)
    await error_of(await proxy.get("/v1/models", headers=bearer(token)), 401)


async def test_max_requests_is_exact_under_concurrency(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, max_requests=50)
    responses = await asyncio.gather(
        *(proxy.get("/v1/models", headers=bearer(token)) for _ in range(200))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert fake.requests_seen == 50
    refused = next(r for r in responses if r.status == 429)
    assert (await error_of(refused, 429))["code"] == "quota_exceeded"


async def test_quota_is_not_spent_by_requests_that_never_reach_upstream(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, max_requests=1, rate_limit_per_hour=1)
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200
    _, other = await proxy_token(proxy, max_requests=2, rate_limit_per_hour=1)
    await proxy.get("/v1/models", headers=bearer(other))
    limited = await proxy.get("/v1/models", headers=bearer(other))
    assert (await error_of(limited, 429))["code"] == "rate_limit_exceeded"
    # the rate-limited call did not use the second request of the quota
    assert proxy.app[TOKEN_STORE_KEY].take_usage()[0].requests in (1, 2)


async def test_rate_limit_refuses_with_retry_after(proxy: Client) -> None:
    _, token = await proxy_token(proxy, rate_limit_per_hour=3)
    for remaining in ("2", "1", "0"):
        ok = await proxy.get("/v1/models", headers=bearer(token))
        assert ok.headers["x-ratelimit-remaining-requests"] == remaining
    refused = await proxy.get("/v1/models", headers=bearer(token))
    assert (await error_of(refused, 429))["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "3"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../manage/tokens",
        "/v1/%2e%2e/manage/tokens",
        "/v1/files%2f..%2fx",
        "/v1/chat/completions/../../admin",
        "/v1//models",
        "/v1/models%00",
        "/v1/unknown",
        "/v1/filesX",
        "/v1/files/a/b/c",
        "/v1/models/",
        "/v1/%2Fetc/passwd",
        "/v1/models/..%5c..%5cmanage",
    ],
)
async def test_path_tricks_never_reach_upstream(
    proxy: Client, fake: FakeUpstreamState, path: str
) -> None:
    _, token = await proxy_token(proxy)
    response = await proxy.get(path, headers=bearer(token))
    assert response.status in (401, 404), await response.text()
    assert response.content_type == "application/json"
    assert fake.requests == []


async def test_disallowed_method_is_405_with_allow(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    response = await proxy.delete("/v1/files/file-abc", headers=bearer(token))
    error = await error_of(response, 405)
    assert error["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET"
    assert fake.requests == []


async def test_allowlist_file_restricts_models(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, tmp_path: Any
) -> None:
    config = tmp_path / "apis.yaml"
    config.write_text(
        "apis:\n  openai:\n    allowed_methods: [GET, POST]\n    allowed_endpoints:\n"
        "      - path: /v1/chat/completions\n        models: ['gpt-4o-*']\n"
    )
    proxy = await start_proxy(API_CONFIG_PATH=str(config))
    _, token = await proxy_token(proxy)
    ok = await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert ok.status == 200
    bad = {**CHAT, "model": "gpt-5-expensive"}
    refused = await proxy.post("/v1/chat/completions", json=bad, headers=bearer(token))
    assert (await error_of(refused, 403))["code"] == "model_not_allowed"
    # The body is peeked whatever the case and parameters of its media type.
    charset = {**bearer(token), "Content-Type": "Application/JSON; charset=utf-8"}
    refused = await proxy.post(
        "/v1/chat/completions", data=orjson.dumps(bad), headers=charset
    )
    assert (await error_of(refused, 403))["code"] == "model_not_allowed"
    assert len(fake.requests) == 1
    models = await proxy.get("/v1/models", headers=bearer(token))
    await error_of(models, 404)


async def test_rate_limit_slot_comes_back_when_the_model_is_refused(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, tmp_path: Any
) -> None:
    config = tmp_path / "apis.yaml"
    config.write_text(
        "apis:\n  openai:\n    allowed_endpoints:\n"
        "      - path: /v1/chat/completions\n        methods: [POST]\n"
        "        models: ['gpt-4o-*']\n"
    )
    proxy = await start_proxy(API_CONFIG_PATH=str(config))
    _, token = await proxy_token(proxy, rate_limit_per_hour=1)
    bad = {**CHAT, "model": "gpt-5-expensive"}
    refused = await proxy.post("/v1/chat/completions", json=bad, headers=bearer(token))
    assert (await error_of(refused, 403))["code"] == "model_not_allowed"
    ok = await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert ok.status == 200
    limited = await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    assert (await error_of(limited, 429))["code"] == "rate_limit_exceeded"
    assert len(fake.requests) == 1


async def test_upstream_unreachable_is_502(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(OPENAI_API_URL="http://127.0.0.1:9", UPSTREAM_RETRIES="1")
    _, token = await proxy_token(proxy)
    response = await proxy.get("/v1/models", headers=bearer(token))
    assert (await error_of(response, 502))["code"] == "upstream_unavailable"


async def test_upstream_unreachable_spends_neither_quota_nor_rate_limit(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy(OPENAI_API_URL="http://127.0.0.1:9", UPSTREAM_RETRIES="0")
    _, token = await proxy_token(proxy, max_requests=1, rate_limit_per_hour=1)
    for _ in range(3):
        response = await proxy.get("/v1/models", headers=bearer(token))
        assert (await error_of(response, 502))["code"] == "upstream_unavailable"


async def test_upstream_silence_is_504(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(UPSTREAM_READ_TIMEOUT="0.2")
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "x-fake-behaviour": "stall-headers"}
    response = await proxy.get("/v1/models", headers=headers)
    assert (await error_of(response, 504))["code"] == "upstream_timeout"
    fake.release()


async def test_breaker_opens_after_consecutive_upstream_5xx(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(BREAKER_FAILURE_THRESHOLD="3", BREAKER_COOLDOWN="60")
    _, token = await proxy_token(proxy)
    failing = {**bearer(token), "x-fake-behaviour": "status-500"}
    for _ in range(3):
        assert (await proxy.get("/v1/models", headers=failing)).status == 500
    response = await proxy.get("/v1/models", headers=bearer(token))
    assert (await error_of(response, 503))["code"] == "circuit_open"
    assert int(response.headers["Retry-After"]) >= 1
    assert fake.requests_seen == 3
    answer = await proxy.get("/ready")
    ready = await answer.json()
    # Still ready (every instance shares the upstream), but plainly not "ok".
    assert answer.status == 200
    assert ready["status"] == "degraded" and ready["degraded"] == ["upstream_breaker"]
    assert ready["checks"]["upstream_breaker"].startswith(
        "degraded: upstream circuit breaker open"
    )


async def test_client_disconnect_mid_stream_releases_upstream(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    response = await open_stalled_stream(proxy)
    await response.content.readuntil(b"\n\n")
    response.close()
    await fake.wait_for(lambda state: state.streams_cancelled == 1, timeout_s=5)
    assert fake.open_streams == 0


async def test_body_over_limit_is_413(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(MAX_REQUEST_BYTES="1000")
    _, token = await proxy_token(proxy)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = await proxy.post("/v1/chat/completions", json=big, headers=bearer(token))
    await error_of(response, 413)


async def test_large_multipart_upload_streams_through(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field(
        "file",
        io.BytesIO(bytes(25 * 1024 * 1024)),
        filename="a.mp3",
        content_type="audio/mpeg",
    )
    response = await proxy.post(
        "/v1/audio/transcriptions", data=form, headers=bearer(token)
    )
    assert response.status == 200, await response.text()
    assert fake.requests[0].body_size > 25 * 1024 * 1024


async def test_path_prefix_in_base_url_is_kept(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, proxy_env: dict[str, str]
) -> None:
    proxy = await start_proxy(OPENAI_API_URL=proxy_env["OPENAI_API_URL"] + "/openai")
    _, token = await proxy_token(proxy)
    await proxy.get("/v1/models?limit=2", headers=bearer(token))
    assert fake.requests[0].path == "/openai/v1/models"
    assert fake.requests[0].query_string == "limit=2"


async def test_request_without_principal_never_logs_token(
    proxy: Client, caplog: pytest.LogCaptureFixture
) -> None:
    _, token = await proxy_token(proxy)
    await proxy.post("/v1/chat/completions", json=CHAT, headers=bearer(token))
    await proxy.get("/v1/nothing", headers=bearer(token))
    assert token not in caplog.text and UPSTREAM_KEY not in caplog.text
    assert orjson.dumps(caplog.text)


async def test_streams_with_injected_usage_are_asked_for_uncompressed(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "Accept-Encoding": "gzip, br"}
    body = {**CHAT, "stream": True}
    response = await proxy.post("/v1/chat/completions", json=body, headers=headers)
    assert await response.read() == load_fixture("chat_stream_no_usage.sse")
    assert fake.requests[0].headers["Accept-Encoding"] == "identity"
    asked = {**body, "stream_options": {"include_usage": False}}
    await proxy.post("/v1/chat/completions", json=asked, headers=headers)
    assert fake.requests[1].headers["Accept-Encoding"] == "gzip, br"


@pytest.mark.parametrize(
    ("header", "media"),
    [
        ("application/json", "application/json"),
        ("Application/JSON ; charset=utf-8", "application/json"),
        ("text/event-stream;charset=utf-8", "text/event-stream"),
        ("", ""),
        (None, ""),
    ],
)
def test_media_type_ignores_case_and_parameters(header: str | None, media: str) -> None:
    assert media_type(header) == media


def _networks(*items: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item) for item in items)


@pytest.mark.parametrize(
    ("remote", "forwarded", "trusted", "client"),
    [
        # nobody trusted: the peer, whatever it claims
        ("10.0.0.5", "203.0.113.7", (), "10.0.0.5"),
        # the peer is not a trusted proxy: its header is not believed
        ("198.51.100.9", "203.0.113.7", ("10.0.0.0/8",), "198.51.100.9"),
        # nginx in front: the address it appended
        ("127.0.0.1", "203.0.113.7", ("127.0.0.1",), "203.0.113.7"),
        # a client's own X-Forwarded-For is on the left, never believed
        ("127.0.0.1", "1.2.3.4, 203.0.113.7", ("127.0.0.1",), "203.0.113.7"),
        # two trusted hops: the right-most address that is not one of them
        ("10.0.0.5", "1.2.3.4, 203.0.113.7, 10.0.0.9", ("10.0.0.0/8",), "203.0.113.7"),
        # every hop trusted: the left-most
        ("10.0.0.5", "10.0.0.7, 10.0.0.9", ("10.0.0.0/8",), "10.0.0.7"),
        # a trusted proxy without the header: the peer
        ("127.0.0.1", None, ("127.0.0.1",), "127.0.0.1"),
        ("127.0.0.1", "", ("127.0.0.1",), "127.0.0.1"),
        # garbage stops the search at the hop that sent it
        ("127.0.0.1", "203.0.113.7, unknown", ("127.0.0.1",), "127.0.0.1"),
        ("10.0.0.5", "unknown, 10.0.0.9", ("10.0.0.0/8",), "10.0.0.9"),
        # IPv6, and the IPv4-mapped form of a dual-stack socket
        ("::1", "2001:db8::7", ("::1",), "2001:db8::7"),
        ("::ffff:127.0.0.1", " 203.0.113.7 ", ("127.0.0.1",), "203.0.113.7"),
        ("127.0.0.1", "::ffff:10.0.0.9, 1.2.3.4", ("127.0.0.1",), "1.2.3.4"),
        (None, "203.0.113.7", ("127.0.0.1",), None),
    ],
)
def test_client_address_believes_only_trusted_proxies(
    remote: str | None, forwarded: str | None, trusted: tuple[str, ...], client: str
) -> None:
    assert client_address(remote, forwarded, _networks(*trusted)) == client


@pytest.mark.parametrize(
    ("trusted", "expected"),
    [("127.0.0.1", "203.0.113.7"), ("10.0.0.0/8", "127.0.0.1")],
)
async def test_forwarded_client_ip_behind_a_trusted_proxy(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    trusted: str,
    expected: str,
) -> None:
    proxy = await start_proxy(FORWARD_CLIENT_IP="true", TRUSTED_PROXIES=trusted)
    _, token = await proxy_token(proxy)
    # what nginx sends: the client's own claim, then the address nginx saw
    headers = {**bearer(token), "X-Forwarded-For": "6.6.6.6, 203.0.113.7"}
    assert (await proxy.get("/v1/models", headers=headers)).status == 200
    assert fake.requests[0].headers.getall("X-Forwarded-For") == [expected]
