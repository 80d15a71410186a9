"""Per-token and per-project caps on calls in flight, and the bounded pool wait."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.proxy.concurrency import InFlight

from ..support import AUTH, bearer, create_project, create_token, proxy_token

Client = TestClient[Any, Any]
CHAT_STREAM = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
STALL = {"x-fake-behaviour": "stall-after-first-event"}


# -- the counters ---------------------------------------------------------------


def test_in_flight_admits_up_to_the_token_cap_then_refuses() -> None:
    calls = InFlight()
    assert [calls.try_enter("t", 2, "p", 10) for _ in range(3)] == [
        None,
        None,
        "token",
    ]
    assert (calls.token_count("t"), calls.project_count("p")) == (2, 2)


def test_in_flight_project_cap_spans_its_tokens() -> None:
    calls = InFlight()
    assert calls.try_enter("a", 5, "p", 2) is None
    assert calls.try_enter("b", 5, "p", 2) is None
    assert calls.try_enter("c", 5, "p", 2) == "project"
    assert calls.try_enter("d", 5, "other", 2) is None
    assert calls.token_count("c") == 0  # a refusal counts nowhere


def test_in_flight_leave_frees_the_slot_and_forgets_idle_keys() -> None:
    calls = InFlight()
    for token in ("a", "b"):
        assert calls.try_enter(token, 1, "p", 2) is None
    assert calls.try_enter("a", 1, "p", 2) == "token"
    calls.leave("a", "p")
    assert calls.try_enter("a", 1, "p", 2) is None
    calls.leave("a", "p")
    calls.leave("b", "p")
    assert len(calls) == 0  # memory is bounded by the calls in flight


def test_in_flight_leave_of_an_unknown_key_never_goes_negative() -> None:
    calls = InFlight()
    calls.leave("ghost", "nowhere")
    assert (calls.token_count("ghost"), calls.project_count("nowhere")) == (0, 0)
    assert len(calls) == 0


# -- through the proxy --------------------------------------------------------------


async def error_of(response: ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def open_stream(proxy: Client, token: str) -> ClientResponse:
    """A streamed call whose upstream stalls after the first event (slot held)."""
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT_STREAM, headers={**bearer(token), **STALL}
    )
    assert response.status == 200, await response.text()
    await response.content.readuntil(b"\n\n")
    return response


@pytest.fixture
async def held() -> AsyncIterator[list[ClientResponse]]:
    """Streams a test keeps open; closed at the end whatever happened."""
    streams: list[ClientResponse] = []
    yield streams
    for stream in streams:
        stream.close()


async def test_token_over_its_cap_gets_429_with_retry_after(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    held: list[ClientResponse],
) -> None:
    proxy = await start_proxy(TOKEN_MAX_CONCURRENT="2")
    project_id, token = await proxy_token(proxy)
    held += [await open_stream(proxy, token) for _ in range(2)]
    refused = await proxy.get("/v1/models", headers=bearer(token))
    error = await error_of(refused, 429)
    assert error["code"] == "concurrency_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert refused.headers["Retry-After"] == "1"
    assert refused.headers["X-Request-ID"]
    assert fake.requests_seen == 2  # refused before the upstream
    sibling = (await create_token(proxy, project_id))["token"]
    assert (await proxy.get("/v1/models", headers=bearer(sibling))).status == 200
    fake.release()
    await held.pop().read()
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200


async def test_project_cap_counts_all_of_its_tokens(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    held: list[ClientResponse],
) -> None:
    proxy = await start_proxy(TOKEN_MAX_CONCURRENT="5", PROJECT_MAX_CONCURRENT="2")
    project_id, first = await proxy_token(proxy)
    second = (await create_token(proxy, project_id))["token"]
    held += [await open_stream(proxy, first), await open_stream(proxy, second)]
    third = (await create_token(proxy, project_id))["token"]
    refused = await proxy.get("/v1/models", headers=bearer(third))
    assert (await error_of(refused, 429))["code"] == "concurrency_limit_exceeded"
    assert "project" in (await refused.json())["error"]["message"]
    _, stranger = await proxy_token(proxy)
    assert (await proxy.get("/v1/models", headers=bearer(stranger))).status == 200
    fake.release()


async def test_client_disconnect_gives_the_slot_back(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState
) -> None:
    proxy = await start_proxy(TOKEN_MAX_CONCURRENT="1")
    _, token = await proxy_token(proxy)
    stream = await open_stream(proxy, token)
    refused = await proxy.get("/v1/models", headers=bearer(token))
    await error_of(refused, 429)
    stream.close()
    await fake.wait_for(lambda state: state.streams_cancelled == 1)
    # The proxy's side of the call ends just after the upstream's: poll briefly.
    for _ in range(200):
        answer = await proxy.get("/v1/models", headers=bearer(token))
        if answer.status == 200:
            break
        await error_of(answer, 429)
        await asyncio.sleep(0.01)
    assert answer.status == 200


async def test_refusal_spends_no_quota_and_no_breaker_failure(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    held: list[ClientResponse],
) -> None:
    proxy = await start_proxy(TOKEN_MAX_CONCURRENT="1", BREAKER_FAILURE_THRESHOLD="1")
    _, token = await proxy_token(proxy, max_requests=3)
    held.append(await open_stream(proxy, token))
    for _ in range(5):
        refused = await proxy.get("/v1/models", headers=bearer(token))
        assert (await error_of(refused, 429))["code"] == "concurrency_limit_exceeded"
    fake.release()
    await held.pop().read()
    ready = await (await proxy.get("/ready")).json()
    assert ready["checks"]["upstream_breaker"] == "ok"
    # One of three requests used: two more pass, the fourth is over quota.
    for _ in range(2):
        assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200
    over = await proxy.get("/v1/models", headers=bearer(token))
    assert (await error_of(over, 429))["code"] == "quota_exceeded"


async def test_token_and_project_overrides_beat_the_defaults(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    held: list[ClientResponse],
) -> None:
    proxy = await start_proxy()  # defaults 100 and 250
    project = await create_project(proxy, "capped", max_concurrent=3)
    tight = (await create_token(proxy, project["project_id"], max_concurrent=1))[
        "token"
    ]
    held.append(await open_stream(proxy, tight))
    refused = await proxy.get("/v1/models", headers=bearer(tight))
    assert "token" in (await error_of(refused, 429))["message"]
    loose = (await create_token(proxy, project["project_id"]))["token"]
    held += [await open_stream(proxy, loose) for _ in range(2)]
    refused = await proxy.get("/v1/models", headers=bearer(loose))
    assert "project" in (await error_of(refused, 429))["message"]
    patched = await proxy.patch(
        f"/manage/projects/{project['project_id']}",
        json={"max_concurrent": None},
        headers=AUTH,
    )
    assert (await patched.json())["max_concurrent"] is None
    assert (await proxy.get("/v1/models", headers=bearer(loose))).status == 200
    fake.release()


# -- the upstream pool ------------------------------------------------------------


async def test_full_pool_answers_503_after_the_pool_timeout_without_retrying(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    held: list[ClientResponse],
) -> None:
    proxy = await start_proxy(
        UPSTREAM_MAX_CONNECTIONS="1",
        UPSTREAM_POOL_TIMEOUT="0.3",
        UPSTREAM_RETRIES="2",
        BREAKER_FAILURE_THRESHOLD="1",
    )
    _, hog = await proxy_token(proxy)
    held.append(await open_stream(proxy, hog))
    _, other = await proxy_token(proxy, max_requests=1)
    started = time.perf_counter()
    refused = await proxy.get("/v1/models", headers=bearer(other))
    waited = time.perf_counter() - started
    error = await error_of(refused, 503)
    assert error["code"] == "upstream_pool_exhausted"
    assert error["type"] == "api_error"
    assert refused.headers["Retry-After"] == "1"
    assert 0.25 <= waited < 0.3 * 3  # one bounded wait, not one per retry
    assert fake.requests_seen == 1
    fake.release()
    await held.pop().read()
    # A full pool is our overload, not the upstream failing: the breaker stays shut.
    ready = await (await proxy.get("/ready")).json()
    assert ready["checks"]["upstream_breaker"] == "ok"
    # The refused call never left the proxy: the token's one request is still unused.
    assert (await proxy.get("/v1/models", headers=bearer(other))).status == 200


@pytest.fixture
def unanswering_port() -> Any:
    """A loopback port whose accept queue is full: new TCP connects hang (SYN dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # more than the queue holds, whatever the kernel rounds to
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_slow_tcp_connect_is_still_the_connect_timeout(
    start_proxy: Callable[..., Any], unanswering_port: int
) -> None:
    proxy = await start_proxy(
        OPENAI_API_URL=f"http://127.0.0.1:{unanswering_port}",
        UPSTREAM_CONNECT_TIMEOUT="0.5",
        UPSTREAM_POOL_TIMEOUT="0.1",
        UPSTREAM_RETRIES="0",
    )
    _, token = await proxy_token(proxy)
    response = await proxy.get("/v1/models", headers=bearer(token))
    assert (await error_of(response, 504))["code"] == "upstream_timeout"
