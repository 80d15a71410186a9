"""What a call's event says matches what happened on the wire."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .support import bearer, proxy_token


async def read_events(path: Path, count: int) -> list[dict[str, Any]]:
    """The event log's lines, once there are at least `count`."""
    async with asyncio.timeout(5):
        while True:
            lines = path.read_bytes().splitlines() if path.exists() else []
            if len(lines) >= count:
                return [orjson.loads(line) for line in lines]
            await asyncio.sleep(0.02)


async def test_our_own_error_answers_count_their_body_in_bytes_out(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
    refused = await proxy.get("/v1/models", headers=bearer("wt-not-a-token"))
    unknown = await proxy.get("/v1/nowhere", headers=bearer(token))
    bodies = [await refused.read(), await unknown.read()]
    assert (refused.status, unknown.status) == (401, 404)
    events = await read_events(log_file, 2)
    assert [e["status_code"] for e in events] == [401, 404]
    assert [e["bytes_out"] for e in events] == [len(body) for body in bodies]


async def test_events_name_the_model_and_creation_time_the_upstream_answered(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
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
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", b"\x00" * 4096, filename="a.wav", content_type="audio/wav")
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
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy = await start_proxy(FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01")
    _, token = await proxy_token(proxy)
    form = aiohttp.FormData()
    form.add_field("model", "gpt-4o-transcribe")
    form.add_field("file", io.BytesIO(b"\x01" * (3 * 1024 * 1024)), filename="a.wav")
    response = await proxy.post(
        "/v1/audio/transcriptions", data=form, headers=bearer(token)
    )
    assert response.status == 200
    (event,) = await read_events(log_file, 1)
    assert event["requested_model"] == "gpt-4o-transcribe"
