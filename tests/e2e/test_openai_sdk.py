"""The official `openai` SDK through the proxy, then the JSONL event log it produced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI

from llm_proxy.devtools.fake_upstream import FakeUpstreamState

from ..support import UPSTREAM_KEY, proxy_token, read_events

MESSAGES: Any = [{"role": "user", "content": "What is 10 + 5?"}]


async def test_openai_sdk_through_the_proxy_with_exact_usage_events(
    start_proxy: Callable[..., Any],
    fake: FakeUpstreamState,
    tmp_path: Path,
    tiktoken_encodings: None,
) -> None:
    log_file = tmp_path / "events.jsonl"
    proxy: TestClient[Any, Any] = await start_proxy(
        FILE_EVENT_LOG=str(log_file), EVENT_FLUSH_INTERVAL="0.01"
    )
    project_id, token = await proxy_token(proxy)
    client = AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key=token, max_retries=0
    )
    async with client:
        chat = await client.chat.completions.create(
            model="gpt-5-nano", messages=MESSAGES
        )
        assert chat.usage is not None and chat.usage.total_tokens == 149

        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(chunk.choices and chunk.usage is None for chunk in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == "10 + 5 equals 15."

        asked = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        last = [chunk async for chunk in asked][-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.total_tokens == 31

        embeddings = await client.embeddings.create(
            model="text-embedding-3-small", input="hello"
        )
        assert embeddings.usage.prompt_tokens > 0

        models = await client.models.list()
        assert [m.id async for m in models]

        transcript = await client.audio.transcriptions.create(
            model="whisper-1", file=("hello.wav", b"RIFF0000WAVEfmt ", "audio/wav")
        )
        assert transcript.text

        cut = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-behaviour": "drop-mid-stream=4"},
        )
        with pytest.raises(openai.APIConnectionError):
            async for _ in cut:
                pass

        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"x-fake-behaviour": "status-429"},
            )
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                extra_headers={"x-fake-behaviour": "status-500"},
            )

    for seen in fake.requests:
        assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert token not in str(dict(seen.headers))

    events = await read_events(log_file, 9)
    assert len(events) == 9 and len({e["event_id"] for e in events}) == 9
    assert all(e["project_id"] == project_id for e in events)
    assert token not in log_file.read_text()
    by_kind = {
        (e["endpoint"], e["stream"], e["status_code"], e["error"]): e for e in events
    }
    plain = by_kind[("/v1/chat/completions", False, 200, None)]
    assert plain["usage_source"] == "upstream"
    assert plain["metadata"]["total_tokens"] == 149
    streams = [
        e
        for e in events
        if e["stream"] and e["error"] is None and e["status_code"] == 200
    ]
    assert [(e["usage_source"], e["usage"]["total_tokens"]) for e in streams] == [
        ("upstream", 31),
        ("upstream", 31),
    ]
    assert by_kind[("/v1/embeddings", False, 200, None)]["usage_source"] == "upstream"
    cut_event = by_kind[
        ("/v1/chat/completions", True, 200, "upstream_stream_interrupted")
    ]
    assert cut_event["usage_source"] == "partial"
    assert 0 < cut_event["usage"]["completion_tokens"] < 8
    statuses = sorted(e["status_code"] for e in events)
    assert statuses == [200] * 7 + [429, 500]
