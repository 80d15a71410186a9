"""Dispatchers against real local HTTP servers: batching, retries, outages, dead letters."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from redis.asyncio import Redis

from llm_proxy.accounting.metrics import Metrics
from llm_proxy.config import ConfigError, Settings
from llm_proxy.dispatchers import (
    DISPATCHERS_KEY,
    DeadLetterFile,
    Dispatcher,
    FileBackend,
    HeliconeBackend,
    HttpBackend,
    HttpPoster,
    LunaryBackend,
    RetryPolicy,
    create_backend,
    event_record,
    run_dispatcher,
)
from llm_proxy.dispatchers.base import DeliveryError, SendResult
from llm_proxy.dispatchers.helicone import as_uuid, helicone_log
from llm_proxy.dispatchers.lunary import lunary_runs
from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.events.model import Event, RequestCompleted
from llm_proxy.events.redis_bus import RedisEventBus
from llm_proxy.keys import REPOSITORY_KEY

from ..support import bearer, proxy_token

REDIS_URL = "redis://127.0.0.1:6379/0"
FAST_RETRY = RetryPolicy(max_retries=3, base_s=0.001, max_s=0.01)
USAGE = {"prompt_tokens": 23, "completion_tokens": 8, "total_tokens": 31}


def make_event(n: int, **fields: Any) -> RequestCompleted:
    values: dict[str, Any] = {
        "request_id": f"req-{n}",
        "project_id": "3f1c2b9e-0000-4000-8000-000000000000",
        "token_id": "tok-1",
        "method": "POST",
        "endpoint": "/v1/chat/completions",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "duration_ms": 12.5,
        "model": "gpt-4o-mini",
        "usage": USAGE,
        "extra": {"usage_source": "upstream"},
        **fields,
    }
    return RequestCompleted(**values)


@dataclass
class Collector:
    """What the recording server got; `answers` scripts its next replies."""

    bodies: list[Any] = field(default_factory=list)
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    default: tuple[int, bytes] = (200, b"ok")
    reply: Callable[[Any], tuple[int, bytes]] | None = None
    auth: list[str] = field(default_factory=list)


@pytest.fixture
async def collector(aiohttp_server: AiohttpServer) -> tuple[Collector, TestServer]:
    state = Collector()

    async def receive(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        state.auth.append(request.headers.get("Authorization", ""))
        status, text = state.answers.pop(0) if state.answers else state.default
        if status == 200 and state.reply is not None:
            status, text = state.reply(body)
        if 200 <= status < 300:
            state.bodies.append(body)
        return web.Response(status=status, body=text)

    app = web.Application()
    app.router.add_post("/ingest", receive)
    return state, await aiohttp_server(app)


async def deliver_all(
    backend: Any, events: list[RequestCompleted], tmp_path: Path, batch: int = 10
) -> tuple[Dispatcher, list[dict[str, Any]]]:
    """Publish `events` on an in-memory bus, run a dispatcher until it drained."""
    bus = InMemoryEventBus(batch_size=batch, flush_interval_s=0.01)
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    dispatcher = Dispatcher(
        backend, bus.subscribe("d"), dead, retry=FAST_RETRY, metrics=Metrics()
    )
    task = asyncio.create_task(dispatcher.run())
    for event in events:
        bus.publish(event)
    await bus.close()
    async with asyncio.timeout(10):
        await task
    return dispatcher, dead.read()


def poster(server: TestServer, key: str | None = "backend-key") -> HttpPoster:
    return HttpPoster(str(server.make_url("/ingest")), key, timeout_s=5)


def ids_of(records: list[dict[str, Any]]) -> list[str]:
    return [r["event_id"] for r in records]


async def test_http_dispatcher_delivers_every_event_once_across_an_outage(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    state.answers = [(503, b"down"), (502, b"down"), (429, b"slow down")]
    events = [make_event(n) for n in range(25)]
    dispatcher, dead = await deliver_all(HttpBackend(poster(server)), events, tmp_path)
    received = [record for body in state.bodies for record in body]
    assert sorted(ids_of(received)) == sorted(e.event_id for e in events)
    assert dead == [] and dispatcher.delivered == 25 and dispatcher.failures == 0
    assert state.auth[0] == "Bearer backend-key"
    assert received[0]["metadata"]["total_tokens"] == 31
    assert received[0]["usage_source"] == "upstream"


async def test_http_dispatcher_dead_letters_after_the_last_retry(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    state.default = (503, b"down for good")
    events = [make_event(n) for n in range(5)]
    dispatcher, dead = await deliver_all(HttpBackend(poster(server)), events, tmp_path)
    assert sorted(d["event"]["event_id"] for d in dead) == sorted(
        e.event_id for e in events
    )
    assert "gave up after 3 retries" in dead[0]["reason"]
    assert dispatcher.dead_lettered == 5 and len(state.auth) == 4


async def test_http_dispatcher_does_not_retry_a_4xx(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    state.default = (400, b"bad payload")
    _, dead = await deliver_all(HttpBackend(poster(server)), [make_event(1)], tmp_path)
    assert len(state.auth) == 1 and "HTTP 400" in dead[0]["reason"]


async def test_http_dispatcher_retries_connection_errors(tmp_path: Path) -> None:
    backend = HttpBackend(HttpPoster("http://127.0.0.1:9/ingest", None, timeout_s=1))
    dispatcher, dead = await deliver_all(backend, [make_event(1)], tmp_path)
    assert len(dead) == 1 and dispatcher.failures == 4


async def test_helicone_dispatcher_sends_each_event_with_usage_and_survives_outage(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    state.answers = [(500, b"oops"), (200, b'{"error": "not stored"}')]
    refused = make_event(99, model="bad")
    state.reply = lambda body: (
        (400, b'{"error": "invalid"}')
        if body["providerRequest"]["json"]["model"] == "bad"
        else (200, b"ok")
    )
    events = [make_event(n) for n in range(6)]
    _, dead = await deliver_all(
        HeliconeBackend(poster(server)), [*events, refused], tmp_path
    )
    meta_ids = [
        b["providerRequest"]["meta"]["Helicone-Request-Id"] for b in state.bodies
    ]
    assert sorted(meta_ids) == sorted(as_uuid(e.event_id) for e in events)
    assert [d["event"]["event_id"] for d in dead] == [refused.event_id]
    body = state.bodies[0]
    assert body["providerResponse"]["json"]["usage"]["total_tokens"] == 31
    assert body["providerRequest"]["meta"]["Helicone-User-Id"] == events[0].project_id
    timing = body["timing"]
    assert timing["startTime"]["seconds"] <= timing["endTime"]["seconds"]


def test_helicone_log_passes_a_logged_stream_as_text_body() -> None:
    stream = make_event(
        1,
        stream=True,
        ttfb_ms=40.0,
        extra={
            "request_body": '{"model": "gpt-4o-mini", "stream": true}',
            "response_body": "data: [DONE]\n\n",
        },
    )
    log = helicone_log(stream, 1_700_000_000.5)
    assert log["providerRequest"]["json"]["stream"] is True
    assert log["providerResponse"]["textBody"] == "data: [DONE]\n\n"
    assert log["timing"]["timeToFirstToken"] == 40.0
    assert log["timing"]["endTime"] == {"seconds": 1_700_000_000, "milliseconds": 500}
    plain = make_event(2, extra={"response_body": '{"id": "x"}'})
    assert helicone_log(plain, 0)["providerResponse"]["json"]["usage"]["prompt_tokens"]
    assert as_uuid("not-hex") == "not-hex"


async def test_lunary_dispatcher_sends_start_and_end_and_dead_letters_refusals(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    events = [make_event(n) for n in range(3)]
    bad = events[1]

    def results(body: Any) -> tuple[int, bytes]:
        out = []
        for run in body["events"]:
            if run["runId"] == as_uuid(bad.event_id):
                out.append({"id": run["runId"], "success": False, "error": "invalid"})
            elif run["event"] == "start" and run["runId"] == as_uuid(
                events[2].event_id
            ):
                error = "Run with this ID already exists in the database."
                out.append({"id": run["runId"], "success": False, "error": error})
            else:
                out.append({"id": run["runId"], "success": True})
        return 200, orjson.dumps({"results": out})

    state.answers = [(429, b"Sometimes You Just Have to Slow Down.")]
    state.reply = results
    dispatcher, dead = await deliver_all(
        LunaryBackend(poster(server)), events, tmp_path
    )
    [body] = state.bodies
    runs = body["events"]
    assert [r["event"] for r in runs] == ["start", "end"] * 3
    assert runs[1]["tokensUsage"] == {"prompt": 23, "completion": 8, "promptCached": 0}
    assert runs[0]["name"] == "gpt-4o-mini" and runs[0]["userId"] == bad.project_id
    assert [d["event"]["event_id"] for d in dead] == [bad.event_id]
    assert dispatcher.delivered == 2


def test_lunary_runs_mark_failures_as_error_events() -> None:
    failed = make_event(1, status_code=500, error="upstream_stream_interrupted")
    start, end = lunary_runs(failed)
    assert end["event"] == "error" and end["error"]["message"] == failed.error
    embed = make_event(2, endpoint="/v1/embeddings", usage=None)
    start, end = lunary_runs(embed)
    assert start["type"] == "embed" and "tokensUsage" not in end


async def test_lunary_unreadable_answer_is_retried(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    state, server = collector
    state.default = (200, b"<html>")
    dispatcher, dead = await deliver_all(
        LunaryBackend(poster(server)), [make_event(1)], tmp_path
    )
    assert len(dead) == 1 and "unreadable" in dead[0]["reason"]


async def test_file_backend_rotates_by_size_and_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    backend = FileBackend(path, max_bytes=2000, backups=2)
    await backend.start()
    events = [make_event(n) for n in range(12)]
    for event in events:
        await backend.send([event])
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for name in files:
        assert (path.parent / name).stat().st_size <= 2000
    last = orjson.loads(path.read_bytes().splitlines()[-1])
    assert last["event_id"] == events[-1].event_id
    assert last["metadata"]["model"] == "gpt-4o-mini"


async def test_file_backend_without_backups_starts_over(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "e.jsonl", max_bytes=600, backups=0)
    for n in range(3):
        await backend.send([make_event(n)])
    assert len((tmp_path / "e.jsonl").read_bytes().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "e.jsonl"]


async def test_file_backend_write_errors_are_transient(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    backend = FileBackend(tmp_path / "dir")
    with pytest.raises(DeliveryError):
        await backend.send([make_event(1)])


class _Exploding:
    name = "exploding"

    async def start(self) -> None: ...

    async def send(self, batch: Any) -> SendResult:
        raise RuntimeError("bug")

    async def close(self) -> None: ...


async def test_dispatcher_survives_a_backend_bug_and_dead_letters(
    tmp_path: Path,
) -> None:
    dispatcher, dead = await deliver_all(_Exploding(), [make_event(1)], tmp_path)
    assert dead[0]["reason"] == "dispatcher error"


def test_retry_delays_grow_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retries=5, base_s=1.0, max_s=4.0)
    assert [policy.delay_s(n, lambda: 1.0) for n in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert policy.delay_s(0, lambda: 0.0) == 0.5


def test_create_backend_needs_its_endpoint_and_key(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"MANAGEMENT_TOKEN": "0123456789abcdef", "FILE_EVENT_LOG": "off"}
    )
    for service in ("file", "http", "helicone", "lunary", "kafka"):
        with pytest.raises(ConfigError):
            create_backend(service, settings)
    assert create_backend("file", settings, endpoint=str(tmp_path / "x")).name == "file"
    assert create_backend("lunary", settings, api_key="k").name == "lunary"
    assert create_backend("helicone", settings, api_key="k").name == "helicone"
    assert create_backend("http", settings, endpoint="http://h/x").name == "http"


def test_event_record_flattens_extra_and_adds_seed_metadata() -> None:
    record = event_record(make_event(1))
    assert "extra" not in record and record["usage_source"] == "upstream"
    assert record["metadata"]["created"] > 0 and record["type"] == "request_completed"
    assert event_record(make_event(2, timestamp="junk"))["metadata"]["created"] == 0


async def test_usage_recorder_writes_rows_for_proxied_calls(
    start_proxy: Callable[..., Any],
) -> None:
    proxy = await start_proxy(EVENT_FLUSH_INTERVAL="0.01", FILE_EVENT_LOG="off")
    project_id, token = await proxy_token(proxy)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    await proxy.post("/v1/chat/completions", json=chat, headers=bearer(token))
    await proxy.get("/v1/models")  # 401: recorded too
    repository = proxy.app[REPOSITORY_KEY]
    async with asyncio.timeout(5):
        while True:
            rows = await repository.recent_usage_events(10)
            if len(rows) >= 2:
                break
            await asyncio.sleep(0.02)
    ok = next(r for r in rows if r.status_code == 200)
    assert ok.project_id == project_id and ok.total_tokens == 149
    assert ok.usage_source == "upstream"
    assert [d.name for d in proxy.app[DISPATCHERS_KEY]] == ["usage"]


async def _require_redis() -> None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is not reachable: {exc}")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_run_dispatcher_delivers_the_redis_stream_and_stops_on_cancel(
    collector: tuple[Collector, TestServer], tmp_path: Path
) -> None:
    await _require_redis()
    state, server = collector
    key = f"llm-proxy-test:{uuid.uuid4().hex}"
    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": "0123456789abcdef",
            "REDIS_URL": REDIS_URL,
            "DEAD_LETTER_DIR": str(tmp_path),
            "DISPATCHER_DRAIN_TIMEOUT": "2",
        }
    )
    producer = RedisEventBus(REDIS_URL, stream_key=key, spool_path=tmp_path / "s")
    await producer.start()
    events: list[Event] = [make_event(n) for n in range(7)]
    try:
        for event in events:
            producer.publish(event)
        task = asyncio.create_task(
            run_dispatcher(
                settings,
                "http",
                endpoint=str(server.make_url("/ingest")),
                batch_size=3,
                flush_interval_s=0.05,
                stream_key=key,
            )
        )
        async with asyncio.timeout(10):
            while True:
                if sum(len(b) for b in state.bodies) >= len(events):
                    break
                await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await producer.close()
        cleanup = Redis.from_url(REDIS_URL)
        await cleanup.delete(key)
        await cleanup.aclose()
    received = [r["event_id"] for body in state.bodies for r in body]
    assert sorted(received) == sorted(e.event_id for e in events)


async def test_run_dispatcher_refuses_to_run_without_redis() -> None:
    settings = Settings.from_env({"MANAGEMENT_TOKEN": "0123456789abcdef"})
    with pytest.raises(ConfigError, match="REDIS_URL"):
        await run_dispatcher(settings, "file", endpoint="x")


def test_lunary_runs_carry_logged_input_and_output() -> None:
    chat = make_event(
        1,
        extra={
            "request_body": '{"messages": [{"role": "user", "content": "hi"}]}',
            "response_body": '{"choices": [{"message": {"content": "hello"}}]}',
        },
    )
    start, end = lunary_runs(chat)
    assert start["input"] == [{"role": "user", "content": "hi"}]
    assert end["output"] == {"role": "assistant", "content": "hello"}
    odd = make_event(2, extra={"request_body": "[1]", "response_body": "{bad"})
    start, end = lunary_runs(odd)
    assert start["input"] is None and end["output"] is None
    broken = make_event(3, extra={"request_body": "{bad", "response_body": 5})
    assert lunary_runs(broken)[0]["input"] is None


class _Refusing:
    """Refuses every event for good and counts the batches it saw."""

    name = "refusing"

    def __init__(self) -> None:
        self.batches = 0

    async def start(self) -> None: ...

    async def send(self, batch: Any) -> SendResult:
        self.batches += 1
        return SendResult(rejected=[(event, "no") for event in batch])

    async def close(self) -> None: ...


async def test_dispatcher_keeps_running_when_dead_letters_cannot_be_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the dead-letter folder should be")
    bus = InMemoryEventBus(batch_size=1, flush_interval_s=0.01)
    backend = _Refusing()
    dead = DeadLetterFile(blocker / "dead.jsonl")
    dispatcher = Dispatcher(backend, bus.subscribe("d"), dead, retry=FAST_RETRY)
    task = asyncio.create_task(dispatcher.run())
    for n in range(3):
        bus.publish(make_event(n))
    await bus.close()
    async with asyncio.timeout(10):
        await task  # raised NotADirectoryError after the first batch
    assert backend.batches == 3 and dispatcher.dead_lettered == 0
    assert "could not dead-letter 1 events" in caplog.text
