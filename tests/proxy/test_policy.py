"""Per-token policy end to end: bound headers, models, output cap, streaming.

Real app, real fake upstream on a loopback port; every refusal is checked not to
reach the upstream by its request count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from llm_proxy.app import create_app
from llm_proxy.config import Settings
from llm_proxy.devtools.fake_upstream import FakeUpstreamState
from llm_proxy.keys import TOKEN_SYNC_KEY

from ..support import (
    AUTH,
    bearer,
    create_project,
    create_token,
    proxy_token,
    read_events,
)

Client = TestClient[Any, Any]
CHAT = "/v1/chat/completions"


def chat(model: str = "gpt-4o-mini", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


async def refused(response: Any, status: int, code: str) -> dict[str, Any]:
    """The error of an OpenAI-shaped refusal with this status and code."""
    assert response.status == status, await response.text()
    error: dict[str, Any] = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


async def test_a_bound_token_is_refused_for_another_user_and_without_the_header(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, bind={"user_id": "alice"})
    bob = {**bearer(token), "X-Proxy-User-Id": "bob"}
    error = await refused(
        await proxy.post(CHAT, json=chat(), headers=bob), 403, "binding_mismatch"
    )
    assert error["type"] == "permission_error"
    assert "X-Proxy-User-Id" in error["message"] and "alice" not in error["message"]
    missing = await proxy.post(CHAT, json=chat(), headers=bearer(token))
    error = await refused(missing, 403, "binding_mismatch")
    assert "alice" not in error["message"]
    twice = [("Authorization", f"Bearer {token}")]
    twice += [("X-Proxy-User-Id", "alice"), ("X-Proxy-User-Id", "bob")]
    await refused(
        await proxy.post(CHAT, json=chat(), headers=twice), 403, "binding_mismatch"
    )
    assert fake.requests_seen == 0
    alice = {**bearer(token), "x-proxy-user-id": "alice", "X-Proxy-Other": "kept"}
    response = await proxy.post(CHAT, json=chat(), headers=alice)
    assert response.status == 200, await response.text()
    [seen] = fake.requests
    assert "X-Proxy-User-Id" not in seen.headers  # the binding stays here
    assert seen.headers["X-Proxy-Other"] == "kept"  # an unbound one is the client's


async def test_every_bound_key_must_match(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(
        proxy, bind={"user_id": "alice", "client_ip": "10.0.0.7"}
    )
    both = {
        **bearer(token),
        "X-Proxy-User-Id": "alice",
        "X-Proxy-Client-Ip": "10.0.0.7",
    }
    assert (await proxy.get("/v1/models", headers=both)).status == 200
    wrong = {**both, "X-Proxy-Client-Ip": "10.0.0.8"}
    error = await refused(
        await proxy.get("/v1/models", headers=wrong), 403, "binding_mismatch"
    )
    assert "X-Proxy-Client-Ip" in error["message"]
    assert fake.requests_seen == 1
    [seen] = fake.requests
    assert not any(name.lower().startswith("x-proxy-") for name in seen.headers)


async def test_a_token_without_policy_forwards_x_proxy_headers_like_any_other(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy)
    headers = {**bearer(token), "X-Proxy-User-Id": "anyone"}
    assert (await proxy.post(CHAT, json=chat(), headers=headers)).status == 200
    assert fake.requests[0].headers["X-Proxy-User-Id"] == "anyone"


async def test_a_model_limited_token_is_refused_other_models(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(
        proxy, allowed_models=["gpt-4o-mini", "text-embedding-3-*"]
    )
    other = await proxy.post(CHAT, json=chat("gpt-4o"), headers=bearer(token))
    error = await refused(other, 403, "model_not_allowed")
    assert error["param"] == "model" and "gpt-4o" in error["message"]
    assert fake.requests_seen == 0
    assert (await proxy.post(CHAT, json=chat(), headers=bearer(token))).status == 200
    embed = {"model": "text-embedding-3-small", "input": "hi"}
    ok = await proxy.post("/v1/embeddings", json=embed, headers=bearer(token))
    assert ok.status == 200, await ok.text()
    assert (await proxy.get("/v1/models", headers=bearer(token))).status == 200
    assert fake.requests_seen == 3


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages": []}',
        b'{"model": 4, "messages": []}',
        b"[1, 2]",
        b"not json",
    ],
)
async def test_a_model_limited_token_fails_closed_on_an_unreadable_model(
    proxy: Client, fake: FakeUpstreamState, body: bytes
) -> None:
    _, token = await proxy_token(proxy, allowed_models=["gpt-4o-mini"])
    headers = {**bearer(token), "Content-Type": "application/json"}
    response = await proxy.post(CHAT, data=body, headers=headers)
    error = await refused(response, 400, "model_required")
    assert error["param"] == "model"
    assert fake.requests_seen == 0


BOUNDARY = "policy-form-boundary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
TRANSCRIBE = "/v1/audio/transcriptions"


def form_body(*fields: tuple[str, str], audio: bytes = b"\x00" * 64) -> bytes:
    """A transcription form: the text fields in order, then the file (or the file
    first, when a field is named "file")."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        f"{value}\r\n".encode()
        for name, value in fields
    ]
    upload = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            'filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        ).encode()
        + audio
        + b"\r\n"
    )
    return b"".join(parts) + upload + f"--{BOUNDARY}--\r\n".encode()


async def chunked(body: bytes, size: int = 4096) -> Any:
    """The body as a chunked upload (no Content-Length): it streams through."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_a_model_limited_token_reads_the_model_of_a_form_upload(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, allowed_models=["whisper-1"])
    headers = {**bearer(token), "Content-Type": FORM_TYPE}
    body = form_body(("model", "whisper-1"), ("language", "en"))
    response = await proxy.post(TRANSCRIBE, data=body, headers=headers)
    assert response.status == 200, await response.text()
    other = form_body(("model", "gpt-4o-transcribe"))
    refusal = await proxy.post(TRANSCRIBE, data=other, headers=headers)
    error = await refused(refusal, 403, "model_not_allowed")
    assert "gpt-4o-transcribe" in error["message"]
    assert fake.requests_seen == 1
    assert fake.requests[0].body == body


async def test_a_streamed_form_upload_is_read_ahead_for_its_model_and_sent_whole(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy, allowed_models=["whisper-*"])
    headers = {**bearer(token), "Content-Type": FORM_TYPE}
    audio = bytes(range(256)) * 4096  # 1 MiB of audio after the fields
    body = form_body(("model", "whisper-1"), audio=audio)
    response = await proxy.post(TRANSCRIBE, data=chunked(body), headers=headers)
    assert response.status == 200, await response.text()
    assert fake.requests[-1].body_size == len(body)
    assert fake.requests[-1].body_sha256 == hashlib.sha256(body).hexdigest()
    other = form_body(("model", "gpt-4o-transcribe"), audio=audio)
    refusal = await proxy.post(TRANSCRIBE, data=chunked(other), headers=headers)
    await refused(refusal, 403, "model_not_allowed")
    assert fake.requests_seen == 1
    events = await read_events(log_file, 2)
    assert [e["requested_model"] for e in events] == ["whisper-1", "gpt-4o-transcribe"]
    assert [e["status_code"] for e in events] == [200, 403]


async def test_a_model_limited_token_fails_closed_when_a_form_hides_its_model(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, allowed_models=["whisper-1"])
    headers = {**bearer(token), "Content-Type": FORM_TYPE}
    after_the_file = form_body(audio=b"\x00" * 20_000) + b""
    after_the_file = after_the_file.replace(
        f"--{BOUNDARY}--".encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f"whisper-1\r\n--{BOUNDARY}--".encode(),
    )
    for body in (form_body(), after_the_file):
        response = await proxy.post(TRANSCRIBE, data=chunked(body), headers=headers)
        error = await refused(response, 400, "model_required")
        assert "form field before the file" in error["message"]
    upload = await proxy.post("/v1/files", data=b"\x00" * 64, headers={**bearer(token)})
    await refused(upload, 400, "model_required")
    assert fake.requests_seen == 0


async def test_a_token_without_streaming_is_refused_a_streamed_transcription(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, allow_streaming=False)
    headers = {**bearer(token), "Content-Type": FORM_TYPE}
    body = form_body(("model", "gpt-4o-transcribe"), ("stream", "true"))
    response = await proxy.post(TRANSCRIBE, data=body, headers=headers)
    await refused(response, 403, "streaming_not_allowed")
    plain = form_body(("model", "gpt-4o-transcribe"), ("stream", "false"))
    assert (await proxy.post(TRANSCRIBE, data=plain, headers=headers)).status == 200
    assert fake.requests_seen == 1


RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
OVER = "output_tokens_cap_exceeded"
UNSET = "output_tokens_cap_required"


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        (CHAT, chat(max_tokens=5000), OVER, "max_tokens"),
        (CHAT, chat(max_completion_tokens=1001), OVER, "max_completion_tokens"),
        (
            CHAT,
            chat(max_tokens=10, max_completion_tokens=2000.0),
            OVER,
            "max_completion_tokens",
        ),
        (
            RESPONSES,
            {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 4096},
            OVER,
            "max_output_tokens",
        ),
        (
            COMPLETIONS,
            {"model": "gpt-4o-mini", "prompt": "hi", "max_tokens": 1024},
            OVER,
            "max_tokens",
        ),
        # Where output is generated, a capped token must name its limit.
        (CHAT, chat(), UNSET, "max_completion_tokens"),
        (CHAT, chat(max_tokens=None), UNSET, "max_completion_tokens"),
        (
            RESPONSES,
            {"model": "gpt-4o-mini", "input": "hi"},
            UNSET,
            "max_output_tokens",
        ),
        (COMPLETIONS, {"model": "gpt-4o-mini", "prompt": "hi"}, UNSET, "max_tokens"),
    ],
)
async def test_a_request_over_or_without_the_output_cap_is_refused(
    proxy: Client,
    fake: FakeUpstreamState,
    path: str,
    body: dict[str, Any],
    code: str,
    param: str,
) -> None:
    _, token = await proxy_token(proxy, max_output_tokens_cap=1000)
    response = await proxy.post(path, json=body, headers=bearer(token))
    error = await refused(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and "1000" in error["message"]
    assert fake.requests_seen == 0


async def test_requests_within_the_cap_pass(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, max_output_tokens_cap=1000)
    calls = [
        (CHAT, chat(max_tokens=1000)),
        (CHAT, chat(max_completion_tokens=1)),
        (
            "/v1/responses",
            {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 500},
        ),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    ]
    for path, body in calls:
        response = await proxy.post(path, json=body, headers=bearer(token))
        assert response.status == 200, (path, await response.text())
    assert fake.requests_seen == len(calls)


async def test_a_token_without_streaming_is_refused_a_stream(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, allow_streaming=False)
    streamed = await proxy.post(CHAT, json=chat(stream=True), headers=bearer(token))
    error = await refused(streamed, 403, "streaming_not_allowed")
    assert error["param"] == "stream"
    assert fake.requests_seen == 0
    plain = await proxy.post(CHAT, json=chat(stream=False), headers=bearer(token))
    assert plain.status == 200
    assert fake.requests_seen == 1


async def test_project_defaults_apply_and_a_token_can_only_narrow_them(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    project = await create_project(
        proxy,
        "narrow",
        allowed_models=["gpt-4o*"],
        max_output_tokens_cap=100,
        allow_streaming=False,
    )
    plain = (await create_token(proxy, project["project_id"]))["token"]
    wider = await create_token(
        proxy,
        project["project_id"],
        allowed_models=["gpt-4o-mini", "o1"],
        max_output_tokens_cap=5000,
        allow_streaming=True,
    )
    await refused(
        await proxy.post(
            CHAT, json=chat("o1", max_tokens=10), headers=bearer(wider["token"])
        ),
        403,
        "model_not_allowed",
    )
    await refused(
        await proxy.post(
            CHAT, json=chat(max_tokens=101), headers=bearer(wider["token"])
        ),
        400,
        "output_tokens_cap_exceeded",
    )
    await refused(
        await proxy.post(
            CHAT, json=chat(max_tokens=5, stream=True), headers=bearer(wider["token"])
        ),
        403,
        "streaming_not_allowed",
    )
    await refused(
        await proxy.post(
            CHAT, json=chat("gpt-3.5", max_tokens=5), headers=bearer(plain)
        ),
        403,
        "model_not_allowed",
    )
    assert fake.requests_seen == 0
    ok = await proxy.post(
        CHAT, json=chat("gpt-4o", max_tokens=100), headers=bearer(plain)
    )
    assert ok.status == 200, await ok.text()


async def test_a_refusal_spends_no_quota_and_is_in_the_call_event(
    start_proxy: Callable[..., Any], fake: FakeUpstreamState, tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy, max_requests=1, allowed_models=["gpt-4o-mini"])
    await refused(
        await proxy.post(CHAT, json=chat("gpt-4o"), headers=bearer(token)),
        403,
        "model_not_allowed",
    )
    assert (await proxy.post(CHAT, json=chat(), headers=bearer(token))).status == 200
    refusal, answered = await read_events(log_file, 2)
    assert refusal["status_code"] == 403 and refusal["error"] == "model_not_allowed"
    assert answered["status_code"] == 200 and answered["error"] is None
    assert fake.requests_seen == 1
    metrics = await (await proxy.get("/metrics")).text()
    assert 'llm_proxy_policy_refusals_total{code="model_not_allowed"} 1.0' in metrics


async def test_changed_project_defaults_apply_to_its_tokens_next_call(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    project_id, token = await proxy_token(proxy)
    assert (
        await proxy.post(CHAT, json=chat("gpt-4o"), headers=bearer(token))
    ).status == 200
    url = f"/manage/projects/{project_id}"
    changed = await proxy.patch(
        url, json={"allowed_models": ["gpt-4o-mini"]}, headers=AUTH
    )
    assert changed.status == 200
    await refused(
        await proxy.post(CHAT, json=chat("gpt-4o"), headers=bearer(token)),
        403,
        "model_not_allowed",
    )
    await proxy.patch(url, json={"allowed_models": None}, headers=AUTH)
    assert (
        await proxy.post(CHAT, json=chat("gpt-4o"), headers=bearer(token))
    ).status == 200
    assert fake.requests_seen == 2


async def test_another_process_enforces_a_policy_after_its_reload(
    aiohttp_client: AiohttpClient, proxy_env: dict[str, str], fake: FakeUpstreamState
) -> None:
    settings = Settings.from_env(proxy_env)
    first = await aiohttp_client(create_app(settings))
    second = await aiohttp_client(create_app(settings))
    _, token = await proxy_token(
        first, bind={"user_id": "alice"}, allowed_models=["gpt-4o-mini"]
    )
    await second.app[TOKEN_SYNC_KEY].reload()
    bob = {**bearer(token), "X-Proxy-User-Id": "bob"}
    await refused(
        await second.post(CHAT, json=chat(), headers=bob), 403, "binding_mismatch"
    )
    alice = {**bearer(token), "X-Proxy-User-Id": "alice"}
    await refused(
        await second.post(CHAT, json=chat("o1"), headers=alice),
        403,
        "model_not_allowed",
    )
    assert (await second.post(CHAT, json=chat(), headers=alice)).status == 200
    assert fake.requests_seen == 1


async def test_a_bound_header_that_is_not_ascii_is_a_mismatch_not_an_error(
    proxy: Client, fake: FakeUpstreamState
) -> None:
    _, token = await proxy_token(proxy, bind={"user_id": "alice"})
    raw = [("Authorization", f"Bearer {token}"), ("X-Proxy-User-Id", "alicé")]
    response = await proxy.get("/v1/models", headers=raw)
    await refused(response, 403, "binding_mismatch")
    assert fake.requests_seen == 0
