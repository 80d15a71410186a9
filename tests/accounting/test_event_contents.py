"""What a call's event says matches what happened on the wire."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from ..support import bearer, proxy_token, read_events


@pytest.fixture
async def logged(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> tuple[TestClient[Any, Any], str, Path]:
    """A proxy writing its events to a JSONL file at once, and a token for it."""
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
    return proxy, token, log_file


def transcription_form(model: str, audio: Any) -> aiohttp.FormData:
    """A transcription upload as the OpenAI SDK sends it: fields, then the file."""
    form = aiohttp.FormData()
    form.add_field("model", model)
    form.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    return form


async def test_our_own_error_answers_count_their_body_in_bytes_out(
    logged: tuple[TestClient[Any, Any], str, Path],
) -> None:
    proxy, token, log_file = logged
    refused = await proxy.get("/v1/models", headers=bearer("wt-not-a-token"))
    unknown = await proxy.get("/v1/nowhere", headers=bearer(token))
    bodies = [await refused.read(), await unknown.read()]
    assert (refused.status, unknown.status) == (401, 404)
    events = await read_events(log_file, 2)
    assert [e["status_code"] for e in events] == [401, 404]
    assert [e["bytes_out"] for e in events] == [len(body) for body in bodies]


async def test_events_name_the_model_and_creation_time_the_upstream_answered(
    logged: tuple[TestClient[Any, Any], str, Path],
) -> None:
    proxy, token, log_file = logged
    asked = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    plain = await proxy.post("/v1/chat/completions", json=asked, headers=bearer(token))
    answered = orjson.loads(await plain.read())
    streamed = await proxy.post(
        "/v1/chat/completions", json={**asked, "stream": True}, headers=bearer(token)
    )
    await streamed.read()
    responses = await proxy.post(
        "/v1/responses",
        json={"model": "gpt-4.1-nano", "input": "hi", "stream": True},
        headers=bearer(token),
    )
    await responses.read()
    one, two, three = await read_events(log_file, 3)
    assert one["model"] == answered["model"] != "gpt-4o-mini"
    assert one["requested_model"] == "gpt-4o-mini"
    assert one["metadata"]["model"] == answered["model"]
    assert one["metadata"]["created"] == answered["created"]
    assert (two["model"], two["requested_model"]) == (
        "gpt-4o-mini-2024-07-18",
        "gpt-4o-mini",
    )
    assert two["metadata"]["created"] == 1764500138
    assert (three["model"], three["requested_model"]) == (
        "gpt-4.1-nano-2025-04-14",
        "gpt-4.1-nano",
    )
    assert three["metadata"]["created"] == 1774963707


async def test_audio_events_record_duration_usage(
    logged: tuple[TestClient[Any, Any], str, Path],
) -> None:
    proxy, token, log_file = logged
    form = transcription_form("whisper-1", b"\x00" * 4096)
    response = await proxy.post(
        "/v1/audio/transcriptions", data=form, headers=bearer(token)
    )
    assert response.status == 200
    usage = orjson.loads(await response.read())["usage"]
    assert usage == {"type": "duration", "seconds": 7}
    (event,) = await read_events(log_file, 1)
    assert event["requested_model"] == event["model"] == "whisper-1"
    assert event["usage"]["type"] == "duration" and event["usage"]["seconds"] == 7
    assert event["usage"]["total_tokens"] == 0  # billed by time, not by tokens
    assert event["usage_source"] == "upstream"


async def test_a_large_streamed_form_still_names_its_model(
    logged: tuple[TestClient[Any, Any], str, Path],
) -> None:
    proxy, token, log_file = logged
    form = transcription_form("gpt-4o-transcribe", io.BytesIO(b"\x01" * 3 * 2**20))
    response = await proxy.post(
        "/v1/audio/transcriptions", data=form, headers=bearer(token)
    )
    assert response.status == 200
    (event,) = await read_events(log_file, 1)
    assert event["requested_model"] == "gpt-4o-transcribe"
