"""Tests for the fake OpenAI upstream, run against the real app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

import llm_proxy.devtools
from llm_proxy.devtools.fake_upstream import (
    BEHAVIOUR_HEADER,
    FAKE_STATE_KEY,
    FakeUpstreamState,
    create_fake_upstream,
    load_fixture,
    parse_behaviours,
    split_sse_events,
    start_fake_upstream,
)

FIXTURES = Path(llm_proxy.devtools.__file__).parent / "fake_fixtures"
Client = TestClient[web.Request, web.Application]
SK_PROJ_KEY = "sk-proj-" + "Q" * 32 + "abcd"
NO_USAGE = "chat_stream_no_usage.sse"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def errors_md_block(heading: str) -> bytes:
    """The first ```json block after ``heading`` in errors.md, as bytes."""
    section = (FIXTURES / "errors.md").read_text().split(heading, 1)[1]
    return section.split("```json\n", 1)[1].split("\n```", 1)[0].encode()


def behave(value: str, **headers: str) -> dict[str, str]:
    return {BEHAVIOUR_HEADER: value, **headers}


async def http_chunks(response: aiohttp.ClientResponse) -> list[bytes]:
    """The body split at HTTP chunk boundaries (one per server-side write)."""
    chunks: list[bytes] = []
    buffer = b""
    async for data, end_of_chunk in response.content.iter_chunks():
        buffer += data
        if end_of_chunk and buffer:
            chunks.append(buffer)
            buffer = b""
    assert buffer == b""
    return chunks


@pytest.fixture
def app() -> web.Application:
    return create_fake_upstream()


@pytest.fixture
def state(app: web.Application) -> FakeUpstreamState:
    return app[FAKE_STATE_KEY]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, app: web.Application) -> Client:
    return await aiohttp_client(app)


CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi"}],
}


# --- fixtures shipped with the package -------------------------------------------


def test_bundled_fixtures_split_back_into_the_exact_file_bytes() -> None:
    for name in (
        "chat_stream_no_usage.sse",
        "chat_stream_with_usage.sse",
        "responses_stream.sse",
    ):
        events = split_sse_events(fixture(name))
        assert b"".join(events) == fixture(name) == load_fixture(name)
        assert all(event.endswith(b"\n\n") for event in events)
    assert split_sse_events(b"data: a\n\ndata: b") == (b"data: a\n\n", b"data: b")


def test_parse_behaviours_reads_names_and_arguments() -> None:
    assert parse_behaviours(None) == {}
    assert parse_behaviours(" Slow-Stream = 0.5 , gzip,,echo") == {
        "slow-stream": "0.5",
        "gzip": "",
        "echo": "",
    }


# --- endpoints --------------------------------------------------------------------


async def test_chat_completion_serves_the_capture_byte_for_byte(client: Client) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["x-ratelimit-remaining-requests"] == "29999"
    assert await response.read() == fixture("chat_completion.json")


async def test_chat_completion_usage_cached_serves_the_cache_hit_capture(
    client: Client,
) -> None:
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers=behave("usage-cached")
    )
    assert await response.read() == fixture("chat_completion_cached.json")


async def test_chat_stream_sends_one_write_per_event_without_usage(
    client: Client,
) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    chunks = await http_chunks(response)
    assert chunks == list(split_sse_events(fixture("chat_stream_no_usage.sse")))


async def test_chat_stream_with_include_usage_serves_the_usage_capture(
    client: Client, state: FakeUpstreamState
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post("/v1/chat/completions", json=body)
    assert await response.read() == fixture("chat_stream_with_usage.sse")
    assert (state.streams_opened, state.streams_completed, state.open_streams) == (
        1,
        1,
        0,
    )


async def test_chat_rejects_a_body_that_is_not_a_json_object(client: Client) -> None:
    for body in (b"{not json", b"[1, 2]"):
        response = await client.post("/v1/chat/completions", data=body)
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert "could not parse the JSON body" in error["message"]


async def test_responses_serves_json_and_stream_captures(client: Client) -> None:
    response = await client.post(
        "/v1/responses", json={"model": "gpt-5-nano", "input": "x"}
    )
    assert await response.read() == fixture("responses_create.json")
    streamed = await client.post("/v1/responses", json={"input": "x", "stream": True})
    assert "x-ratelimit-limit-requests" not in streamed.headers
    chunks = await http_chunks(streamed)
    assert chunks == list(split_sse_events(fixture("responses_stream.sse")))


async def test_embeddings_follow_the_encoding_format(client: Client) -> None:
    floats = await client.post("/v1/embeddings", json={"input": "x"})
    assert await floats.read() == fixture("embeddings.json")
    base64 = await client.post(
        "/v1/embeddings", json={"input": "x", "encoding_format": "base64"}
    )
    assert await base64.read() == fixture("embeddings_base64.json")


async def test_models_list_and_retrieve(client: Client) -> None:
    listing = await client.get("/v1/models")
    assert await listing.read() == fixture("models_list.json")
    one = await client.get("/v1/models/whisper-1")
    assert await one.json() == {
        "id": "whisper-1",
        "object": "model",
        "created": 1677532384,
        "owned_by": "openai-internal",
    }


async def test_unknown_model_answers_openai_model_not_found(client: Client) -> None:
    response = await client.get("/v1/models/gpt-4.1-nano-wrong")
    assert response.status == 404
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = await response.read()
    assert body == errors_md_block("### 404: model not found") + b"\n"
    assert len(body) == 224  # the captured Content-Length


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        ("/v1/completions", "object", "text_completion"),
        ("/v1/moderations", "model", "omni-moderation-latest"),
        ("/v1/images/generations", "created", 1713833628),
    ],
)
async def test_reconstructed_endpoints_answer_spec_shaped_json(
    client: Client, path: str, key: str, value: object
) -> None:
    response = await client.post(path, json={"model": "m", "input": "x", "prompt": "x"})
    assert response.status == 200
    body = await response.read()
    assert body.endswith(b"}\n")
    assert json.loads(body)[key] == value


def _upload_form(content: bytes, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("file", content, filename="speech.mp3", content_type="audio/mpeg")
    return form


async def test_transcription_reads_and_sizes_the_whole_upload(
    client: Client, state: FakeUpstreamState
) -> None:
    audio = bytes(range(256)) * 1024
    response = await client.post(
        "/v1/audio/transcriptions", data=_upload_form(audio, model="whisper-1")
    )
    assert await response.read() == fixture("audio_transcription.json")
    recorded = state.requests[-1]
    assert recorded.body_size == len(recorded.body) > len(audio)
    assert audio in recorded.body
    assert recorded.body_sha256 == hashlib.sha256(recorded.body).hexdigest()


async def test_transcription_usage_tokens_serves_the_token_variant(
    client: Client,
) -> None:
    response = await client.post(
        "/v1/audio/transcriptions",
        data=_upload_form(b"RIFF", model="gpt-4o-transcribe"),
        headers=behave("usage-tokens"),
    )
    assert await response.read() == fixture("audio_transcription_tokens.json")


async def test_files_upload_then_retrieve_metadata_and_content(client: Client) -> None:
    uploaded = await client.post(
        "/v1/files", data=_upload_form(b"line\n" * 10, purpose="batch")
    )
    created = await uploaded.json()
    assert created["object"] == "file"
    assert (created["filename"], created["purpose"], created["bytes"]) == (
        "speech.mp3",
        "batch",
        50,
    )
    again = await client.get(f"/v1/files/{created['id']}")
    assert await again.json() == created
    content = await client.get(f"/v1/files/{created['id']}/content")
    assert content.headers["Content-Type"] == "application/octet-stream"
    assert await content.read() == b"line\n" * 10


async def test_files_upload_without_a_form_still_answers_a_file_object(
    client: Client,
) -> None:
    response = await client.post("/v1/files", json={"purpose": "x"})
    created = await response.json()
    assert (created["filename"], created["purpose"], created["bytes"]) == (
        "upload",
        "user_data",
        0,
    )


async def test_unknown_file_answers_404_on_both_file_paths(client: Client) -> None:
    for path in ("/v1/files/file-nope", "/v1/files/file-nope/content"):
        response = await client.get(path)
        assert response.status == 404
        error = (await response.json())["error"]
        assert (error["message"], error["param"]) == (
            "No such File object: file-nope",
            "id",
        )


async def test_unknown_path_or_method_answers_invalid_url(client: Client) -> None:
    response = await client.get("/v1/chat/completions")
    assert response.status == 404
    error = (await response.json())["error"]
    assert error["message"] == "Invalid URL (GET /v1/chat/completions)"


# --- error behaviours -------------------------------------------------------------


async def test_status_429_sends_openai_rate_limit_body_and_headers(
    client: Client,
) -> None:
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers=behave("status-429")
    )
    assert response.status == 429
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["retry-after"] == "4"
    assert response.headers["x-ratelimit-reset-tokens"] == "3.89s"
    assert response.headers["x-ratelimit-remaining-tokens"] == "1961"
    assert await response.read() == errors_md_block("### 429") + b"\n"


async def test_status_401_masks_the_presented_key_like_openai(client: Client) -> None:
    headers = behave("status-401", Authorization=f"Bearer {SK_PROJ_KEY}")
    response = await client.get("/v1/models", headers=headers)
    assert response.status == 401
    assert response.headers["vary"] == "Origin"
    assert await response.read() == errors_md_block("### 401") + b"\n"


async def test_status_401_echoes_short_keys_and_explains_a_missing_key(
    client: Client,
) -> None:
    short = await client.get(
        "/v1/models", headers=behave("status-401", Authorization="Bearer sk-XXX")
    )
    assert (await short.json())["error"]["message"].startswith(
        "Incorrect API key provided: sk-XXX."
    )
    missing = await client.get("/v1/models", headers=behave("status-401"))
    error = (await missing.json())["error"]
    assert error["message"].startswith("You didn't provide an API key.")
    assert error["code"] is None


async def test_status_500_sends_the_server_error_body(client: Client) -> None:
    response = await client.post("/v1/responses", json={}, headers=behave("status-500"))
    assert response.status == 500
    assert response.headers["Content-Type"] == "application/json"
    assert await response.read() == errors_md_block("### 500")


async def test_other_status_codes_get_a_generic_openai_error(client: Client) -> None:
    response = await client.get("/v1/models", headers=behave("status-503"))
    assert response.status == 503
    assert (await response.json())["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    "value",
    [
        "no-such-thing",
        "status-200",
        "status-abc",
        "slow-stream=fast",
        "drop-mid-stream=1.5",
        "sse-framing=crlf2",
    ],
)
async def test_bad_behaviour_header_is_rejected_with_400(
    client: Client, value: str
) -> None:
    response = await client.get("/v1/models", headers=behave(value))
    assert response.status == 400
    assert "fake upstream:" in (await response.json())["error"]["message"]


# --- SSE framing behaviours -------------------------------------------------------


async def test_sse_framing_crlf_sends_each_event_with_crlf_line_ends(
    client: Client,
) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=behave("sse-framing=crlf"),
    )
    chunks = await http_chunks(response)
    events = split_sse_events(fixture(NO_USAGE))
    assert chunks == [event.replace(b"\n", b"\r\n") for event in events]


async def test_sse_framings_combine_and_keep_every_payload(client: Client) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=behave("sse-framing=mixed, sse-spaced-json, sse-keepalive"),
    )
    body = await response.read()
    assert b"\r\n" in body and b"\r\r" in body and b"\n\r" in body
    lines = body.splitlines()
    original = fixture("chat_stream_no_usage.sse").splitlines()
    assert lines.count(b": keep-alive") == len(split_sse_events(fixture(NO_USAGE)))
    assert len(lines) == 2 * len(original)  # a keep-alive event per event
    payloads = [line for line in lines if line.startswith(b"data: {")]
    assert [orjson.loads(p[6:]) for p in payloads] == [
        orjson.loads(line[6:]) for line in original if line.startswith(b"data: {")
    ]
    assert all(b'"choices": [' in p for p in payloads)


async def test_sse_no_blank_lines_ends_events_with_one_line_end(client: Client) -> None:
    response = await client.post(
        "/v1/responses",
        json={"stream": True},
        headers=behave("sse-no-blank-lines, sse-framing=cr"),
    )
    body = await response.read()
    assert b"\n" not in body and b"\r\r" not in body
    assert body.split(b"\r") == fixture("responses_stream.sse").replace(
        b"\n\n", b"\n"
    ).split(b"\n")


# --- header and body behaviours ---------------------------------------------------


async def test_gzip_sends_an_encoded_body_with_content_encoding(
    aiohttp_client: AiohttpClient, app: web.Application
) -> None:
    client = await aiohttp_client(app, auto_decompress=False)
    response = await client.post(
        "/v1/chat/completions", json=CHAT, headers=behave("gzip")
    )
    assert response.headers["Content-Encoding"] == "gzip"
    raw = await response.read()
    assert raw != fixture("chat_completion.json")
    assert gzip.decompress(raw) == fixture("chat_completion.json")


async def test_set_cookie_adds_a_cookie_header(client: Client) -> None:
    response = await client.get("/v1/models", headers=behave("set-cookie=ignored"))
    assert response.headers["Set-Cookie"].startswith("__cf_bm=")
    assert await response.read() == fixture("models_list.json")


async def test_echo_describes_the_request_received(client: Client) -> None:
    response = await client.post(
        "/v1/anything?a=1&b=2",
        data=b"hello",
        headers=behave("echo", **{"X-Custom": "v"}),
    )
    echo = await response.json()
    assert (echo["method"], echo["path"], echo["query_string"]) == (
        "POST",
        "/v1/anything",
        "a=1&b=2",
    )
    assert ["X-Custom", "v"] in echo["headers"]
    assert echo["body_length"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


# --- recording --------------------------------------------------------------------


async def test_every_request_is_recorded_with_headers_and_body(
    client: Client, state: FakeUpstreamState
) -> None:
    body = json.dumps(CHAT).encode()
    await client.post(
        "/v1/chat/completions?x=1",
        data=body,
        headers={"Authorization": "Bearer up", "Content-Type": "application/json"},
    )
    await client.get("/v1/models")
    first, second = state.requests
    assert (first.method, first.path, first.query_string) == (
        "POST",
        "/v1/chat/completions",
        "x=1",
    )
    assert first.headers.getall("authorization") == ["Bearer up"]
    assert first.body == body
    assert first.json() == CHAT
    assert not first.body_truncated
    assert (second.method, second.body, second.body_size) == ("GET", b"", 0)
    assert state.requests_seen == 2


async def test_large_uploads_keep_a_bounded_prefix_and_the_full_size(
    aiohttp_client: AiohttpClient,
) -> None:
    app = create_fake_upstream(max_recorded_body_bytes=1024)
    client = await aiohttp_client(app)
    content = b"z" * 200_000
    response = await client.post(
        "/v1/files", data=_upload_form(content, purpose="batch")
    )
    recorded = app[FAKE_STATE_KEY].requests[-1]
    assert recorded.body_truncated
    assert 1024 <= len(recorded.body) < recorded.body_size
    assert recorded.body_size > len(content)
    assert (await response.json())["bytes"] == recorded.body_size


async def test_recording_can_be_switched_off_but_requests_are_counted(
    aiohttp_client: AiohttpClient,
) -> None:
    app = create_fake_upstream(record=False)
    client = await aiohttp_client(app)
    await client.get("/v1/models")
    assert app[FAKE_STATE_KEY].requests == []
    assert app[FAKE_STATE_KEY].requests_seen == 1


async def test_wait_for_times_out_when_nothing_changes(
    state: FakeUpstreamState,
) -> None:
    with pytest.raises(TimeoutError):
        await state.wait_for(lambda s: s.requests_seen > 0, timeout_s=0.02)


# --- stalls, gates and drops ------------------------------------------------------


async def test_stall_headers_holds_the_response_until_the_gate_opens(
    client: Client, state: FakeUpstreamState
) -> None:
    pending = asyncio.ensure_future(
        client.get("/v1/models", headers=behave("stall-headers"))
    )
    await state.wait_for(lambda s: s.stalled == 1)
    assert not pending.done()
    state.release()
    response = await asyncio.wait_for(pending, 5)
    assert await response.read() == fixture("models_list.json")
    assert state.stalled == 0


async def test_stall_headers_notices_a_client_that_leaves(
    client: Client, state: FakeUpstreamState
) -> None:
    pending = asyncio.ensure_future(
        client.get("/v1/models", headers=behave("stall-headers"))
    )
    await state.wait_for(lambda s: s.stalled == 1)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    await state.wait_for(lambda s: s.disconnects == 1)
    assert (state.stalled, state.streams_cancelled) == (0, 0)


async def test_stall_after_first_event_sends_only_the_first_event(
    client: Client, state: FakeUpstreamState
) -> None:
    events = split_sse_events(fixture("chat_stream_no_usage.sse"))
    response = await client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=behave("stall-after-first-event"),
    )
    async with asyncio.timeout(5):
        first = await response.content.readexactly(len(events[0]))
    assert first == events[0]
    await state.wait_for(lambda s: s.stalled == 1)
    assert state.open_streams == 1
    state.release()
    assert first + await response.read() == fixture("chat_stream_no_usage.sse")
    assert state.streams_completed == 1


async def test_stall_after_first_event_counts_a_client_that_leaves(
    client: Client, state: FakeUpstreamState
) -> None:
    response = await client.post(
        "/v1/responses",
        json={"stream": True},
        headers=behave("stall-after-first-event"),
    )
    await response.content.readuntil(b"\n\n")
    await state.wait_for(lambda s: s.stalled == 1)
    response.close()
    await state.wait_for(lambda s: s.streams_cancelled == 1)
    assert (state.open_streams, state.disconnects, state.stalled) == (0, 1, 0)


async def test_stall_after_first_event_splits_a_json_body_in_two(
    client: Client, state: FakeUpstreamState
) -> None:
    response = await client.get("/v1/models", headers=behave("stall-after-first-event"))
    body = fixture("models_list.json")
    assert response.headers["Content-Length"] == str(len(body))
    first = await response.content.readexactly(len(body) // 2)
    await state.wait_for(lambda s: s.stalled == 1)
    state.release()
    assert first + await response.read() == body


async def test_drop_mid_stream_closes_the_connection_after_some_events(
    client: Client, state: FakeUpstreamState
) -> None:
    events = split_sse_events(fixture("chat_stream_with_usage.sse"))
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(
        "/v1/chat/completions", json=body, headers=behave("drop-mid-stream=3")
    )
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in response.content.iter_any():
            received += data
    assert received == b"".join(events[:3])
    assert (state.streams_dropped, state.open_streams) == (1, 0)


async def test_drop_mid_stream_defaults_to_half_a_json_body(client: Client) -> None:
    response = await client.get("/v1/models", headers=behave("drop-mid-stream"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_slow_stream_still_delivers_every_event_in_its_own_write(
    client: Client,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post(
        "/v1/responses", json={"stream": True}, headers=behave("slow-stream=0.002")
    )
    chunks = await http_chunks(response)
    assert chunks == list(split_sse_events(fixture("responses_stream.sse")))
    assert loop.time() - started >= 0.002 * (len(chunks) - 1)


async def test_slow_stream_notices_a_client_that_leaves_on_the_next_write(
    client: Client, state: FakeUpstreamState
) -> None:
    response = await client.post(
        "/v1/responses", json={"stream": True}, headers=behave("slow-stream=0.02")
    )
    await response.content.readuntil(b"\n\n")
    response.close()
    await state.wait_for(lambda s: s.streams_cancelled == 1)
    assert state.streams_completed == 0


async def test_chunk_delay_applies_between_stream_events(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(create_fake_upstream(chunk_delay_s=0.001))
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert await response.read() == fixture("chat_stream_no_usage.sse")
    events = len(split_sse_events(fixture("chat_stream_no_usage.sse")))
    assert loop.time() - started >= 0.001 * (events - 1)


# --- standalone server ------------------------------------------------------------


async def test_start_fake_upstream_serves_on_a_free_port_until_cleanup() -> None:
    runner, url = await start_fake_upstream()
    try:
        assert url.host == "127.0.0.1" and url.port and url.path == "/"
        async with aiohttp.ClientSession() as session:
            async with session.get(url / "v1" / "models") as response:
                assert await response.read() == fixture("models_list.json")
        state = runner.app[FAKE_STATE_KEY]
        assert (state.requests, state.requests_seen) == ([], 1)
    finally:
        await runner.cleanup()


async def test_start_fake_upstream_cancels_the_handler_when_the_client_leaves() -> None:
    app = create_fake_upstream()
    state = app[FAKE_STATE_KEY]
    runner, url = await start_fake_upstream(app=app)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                url / "v1" / "chat" / "completions",
                json={**CHAT, "stream": True},
                headers=behave("stall-after-first-event"),
            )
            await response.content.readuntil(b"\n\n")
            await state.wait_for(lambda s: s.stalled == 1)
            response.close()
            await state.wait_for(lambda s: s.streams_cancelled == 1)
    finally:
        await runner.cleanup()


async def test_start_fake_upstream_cleans_up_when_the_port_is_taken() -> None:
    runner, url = await start_fake_upstream()
    try:
        assert url.port is not None
        with pytest.raises(OSError):
            await start_fake_upstream(port=url.port)
    finally:
        await runner.cleanup()


async def test_stalls_notice_a_leaving_client_without_handler_cancellation() -> None:
    # aiohttp's own default (handler_cancellation=False): the fake must poll the
    # transport, or a stalled handler would never learn that the client left.
    app = create_fake_upstream()
    state = app[FAKE_STATE_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(
                session.get(f"{base}/v1/models", headers=behave("stall-headers"))
            )
            await state.wait_for(lambda s: s.stalled == 1)
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            await state.wait_for(lambda s: s.disconnects == 1 and s.stalled == 0)
            response = await session.post(
                f"{base}/v1/responses",
                json={"stream": True},
                headers=behave("stall-after-first-event"),
            )
            await response.content.readuntil(b"\n\n")
            await state.wait_for(lambda s: s.stalled == 1)
            response.close()
            await state.wait_for(lambda s: s.streams_cancelled == 1)
        assert (state.disconnects, state.open_streams) == (2, 0)
    finally:
        await runner.cleanup()
