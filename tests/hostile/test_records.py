"""Hostile input against what the proxy records: metric labels, usage rows, files."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from llm_proxy.accounting.instrumentation import INSTRUMENTATION_KEY, observe
from llm_proxy.accounting.metrics import MAX_MODEL_LABELS, OTHER, Metrics
from llm_proxy.accounting.usage import Usage
from llm_proxy.dispatchers import (
    DeadLetterFile,
    Dispatcher,
    FileBackend,
    RetryPolicy,
    UsageRecorder,
)
from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.events.model import RequestCompleted
from llm_proxy.events.redis_bus import RedisEventBus
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.storage import (
    PostgresRepository,
    Repository,
    SqliteRepository,
    UsageEvent,
)

from ..support import _postgres_schema, _postgres_url, bearer, proxy_token

Client = TestClient[Any, Any]
FAST_RETRY = RetryPolicy(max_retries=2, base_s=0.001, max_s=0.01)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
PROJECT_ID = "3f1c2b9e-0000-4000-8000-000000000000"
WEBDAV_METHODS = ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "REPORT")
USAGE = {"prompt_tokens": 23, "completion_tokens": 8, "total_tokens": 31}


# -- metric labels --------------------------------------------------------------------


def series(text: str) -> list[str]:
    """The sample lines of a Prometheus text exposition."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def label_values(text: str, metric: str, label: str) -> set[str]:
    """Every value `label` takes in the samples of `metric`."""
    values = set()
    for line in series(text):
        if line.startswith(metric + "{") and f'{label}="' in line:
            values.add(line.split(f'{label}="', 1)[1].split('"', 1)[0])
    return values


def finished_call(model: str, *, method: str = "POST", status: int = 200) -> Exchange:
    exchange = Exchange(secrets.token_hex(8), started=1.0, method=method)
    exchange.endpoint, exchange.path = "/v1/chat/completions", "/v1/chat/completions"
    exchange.status, exchange.finished = status, 1.25
    exchange.project_id, exchange.model = PROJECT_ID, model
    return exchange


def test_twenty_thousand_random_models_leave_the_series_count_unchanged() -> None:
    metrics = Metrics()
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    for n in range(MAX_MODEL_LABELS + 50):
        observe(metrics, finished_call(f"model-{n}"), usage)
    before = metrics.render().decode()
    for _ in range(20_000):
        observe(metrics, finished_call(secrets.token_hex(12)), usage)
    after = metrics.render().decode()
    assert len(series(after)) == len(series(before))
    models = label_values(after, "llm_proxy_tokens_total", "model")
    assert len(models) == MAX_MODEL_LABELS + 1 and OTHER in models
    assert "model-0" in models and f"model-{MAX_MODEL_LABELS}" not in models
    assert len(after) < 64 * 1024, len(after)


def test_random_methods_and_odd_statuses_share_one_other_label() -> None:
    metrics = Metrics()
    for n in range(500):
        observe(metrics, finished_call("m", method=f"M{n}"), None)
        observe(metrics, finished_call("m", status=600 + n), None)
    observe(metrics, finished_call("m", method="GET", status=404), None)
    text = metrics.render().decode()
    methods = label_values(text, "llm_proxy_requests_total", "method")
    statuses = label_values(text, "llm_proxy_requests_total", "status")
    assert methods == {"POST", "GET", OTHER}
    assert statuses == {"200", "404", OTHER}


async def eventually(check: Callable[[], bool], timeout_s: float = 20) -> None:
    """Wait until `check()` holds (for state another task or thread moves on)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


async def settle(client: Client, count: int) -> None:
    """Wait until the instrumentation has processed `count` calls."""
    instrumentation = client.app[INSTRUMENTATION_KEY]
    await eventually(lambda: instrumentation.processed >= count)


async def test_random_models_and_methods_through_the_proxy_stay_bounded(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    config = tmp_path / "apis.yaml"
    config.write_text(
        "apis:\n  openai:\n    allowed_methods: [GET, POST]\n    allowed_endpoints:\n"
        "      - path: /v1/chat/completions\n"
        "        models: ['junk-*', 'gpt-4o-mini']\n"
    )
    proxy: Client = await start_proxy(API_CONFIG_PATH=str(config))
    _, token = await proxy_token(proxy)
    calls = MAX_MODEL_LABELS + 60

    async def chat(model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        response = await proxy.post(
            "/v1/chat/completions", json=body, headers=bearer(token)
        )
        assert response.status == 200, await response.text()

    for start in range(0, calls, 20):
        batch = range(start, min(start + 20, calls))
        await asyncio.gather(*(chat(f"junk-{n}") for n in batch))
    await chat("gpt-4o-mini")  # named by the allowlist: its own label even now
    # aiohttp's C parser knows some 30 methods (its pure-Python one takes any token).
    for method in WEBDAV_METHODS:
        response = await proxy.request(method, "/v1/nothing")
        assert response.status in (404, 405), await response.text()
    await settle(proxy, calls + 1 + len(WEBDAV_METHODS))
    text = (await (await proxy.get("/metrics")).read()).decode()
    models = label_values(text, "llm_proxy_tokens_total", "model")
    assert len(models) == MAX_MODEL_LABELS + 2, len(models)
    assert {OTHER, "gpt-4o-mini", "junk-0"} <= models
    methods = label_values(text, "llm_proxy_requests_total", "method")
    assert methods == {"POST", OTHER}


# -- usage rows -----------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
async def repository(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Repository]:
    """A connected, migrated repository of each backend on a fresh database."""
    if request.param == "sqlite":
        repository: Repository = SqliteRepository(tmp_path / "proxy.db")
        await repository.connect()
        await repository.migrate()
        yield repository
        await repository.close()
        return
    async with _postgres_schema() as schema:
        repository = PostgresRepository(_postgres_url(), schema=schema)
        await repository.connect()
        await repository.migrate()
        yield repository
        await repository.close()


def call_event(n: int, **fields: Any) -> RequestCompleted:
    values: dict[str, Any] = {
        "request_id": f"req-{n}",
        "project_id": PROJECT_ID,
        "token_id": None,
        "method": "POST",
        "endpoint": "/v1/chat/completions",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "duration_ms": 1.5,
        "model": "gpt-4o-mini",
        "usage": USAGE,
        "extra": {"usage_source": "upstream"},
        **fields,
    }
    return RequestCompleted(**values)


class CountingRepository:
    """Passes inserts through to a real repository and counts them."""

    def __init__(self, inner: Repository) -> None:
        self.inner = inner
        self.inserts = 0
        self.fail_next: list[Exception] = []

    async def insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        self.inserts += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        return await self.inner.insert_usage_events(events)


async def record(
    repository: Repository, events: list[RequestCompleted], tmp_path: Path
) -> tuple[Dispatcher, list[dict[str, Any]], CountingRepository]:
    """Deliver `events` as one batch through the usage recorder."""
    counting = CountingRepository(repository)
    bus = InMemoryEventBus(batch_size=len(events), flush_interval_s=0.01)
    dead = DeadLetterFile(tmp_path / "dead" / "dead-letter-usage.jsonl")
    recorder = UsageRecorder(counting)  # type: ignore[arg-type]
    dispatcher = Dispatcher(recorder, bus.subscribe("usage"), dead, retry=FAST_RETRY)
    task = asyncio.create_task(dispatcher.run())
    for event in events:
        bus.publish(event)
    await bus.close()
    async with asyncio.timeout(20):
        await task
    return dispatcher, dead.read(), counting


async def stored_models(repository: Repository) -> list[str | None]:
    rows = await repository.recent_usage_events(limit=1000)
    return [row.model for row in rows]


async def test_a_nul_in_the_model_is_stored_replaced_with_the_batch(
    repository: Repository, tmp_path: Path
) -> None:
    events = [call_event(n) for n in range(50)]
    events.append(call_event(50, model="gpt\x00-4o", endpoint="/v1/x\x00"))
    dispatcher, dead, counting = await record(repository, events, tmp_path)
    assert dead == [] and dispatcher.delivered == 51
    assert counting.inserts == 1
    models = await stored_models(repository)
    assert len(models) == 51 and "gpt\ufffd-4o" in models
    assert not any("\x00" in (model or "") for model in models)


async def test_a_row_the_database_refuses_is_dead_lettered_alone(
    repository: Repository, tmp_path: Path
) -> None:
    bad = call_event(17, usage={**USAGE, "prompt_tokens": 2**63})
    events = [call_event(n) for n in range(17)] + [bad]
    events += [call_event(n) for n in range(18, 51)]
    dispatcher, dead, counting = await record(repository, events, tmp_path)
    assert [entry["event"]["event_id"] for entry in dead] == [bad.event_id]
    assert "prompt_tokens" in dead[0]["reason"]
    assert dispatcher.delivered == 50 and dispatcher.dead_lettered == 1
    assert len(await stored_models(repository)) == 50
    assert counting.inserts <= 2 * 6 + 1  # a bisection, not row by row


async def test_several_refused_rows_are_each_dead_lettered(
    repository: Repository, tmp_path: Path
) -> None:
    bad_ids = {3, 4, 40}
    events = [
        call_event(n, status_code=2**40) if n in bad_ids else call_event(n)
        for n in range(51)
    ]
    dispatcher, dead, _ = await record(repository, events, tmp_path)
    assert sorted(entry["event"]["request_id"] for entry in dead) == [
        "req-3",
        "req-4",
        "req-40",
    ]
    assert dispatcher.delivered == 48
    assert len(await stored_models(repository)) == 48


async def test_a_foreign_event_with_a_numeric_time_does_not_fail_its_batch(
    repository: Repository, tmp_path: Path
) -> None:
    odd = call_event(5, timestamp=1_764_000_000)  # a number, not ISO text
    events = [call_event(n) for n in range(5)] + [odd]
    dispatcher, dead, counting = await record(repository, events, tmp_path)
    assert dead == [] and dispatcher.delivered == 6 and counting.inserts == 1
    rows = await repository.recent_usage_events(limit=10)
    assert len(rows) == 6
    assert min(row.ts for row in rows).year == 1970  # unreadable time: epoch 0


async def test_a_connection_error_retries_the_whole_batch_unsplit(
    repository: Repository, tmp_path: Path
) -> None:
    counting = CountingRepository(repository)
    counting.fail_next = [ConnectionResetError("server closed the connection")]
    recorder = UsageRecorder(counting)  # type: ignore[arg-type]
    metrics = Metrics()
    bus = InMemoryEventBus(batch_size=20, flush_interval_s=0.01)
    dead = DeadLetterFile(tmp_path / "dead.jsonl")
    dispatcher = Dispatcher(
        recorder, bus.subscribe("usage"), dead, retry=FAST_RETRY, metrics=metrics
    )
    task = asyncio.create_task(dispatcher.run())
    for n in range(20):
        bus.publish(call_event(n))
    await bus.close()
    async with asyncio.timeout(20):
        await task
    assert dead.read() == [] and dispatcher.delivered == 20
    assert counting.inserts == 2  # one failure, one retry of the same 20 rows
    failures = 'llm_proxy_dispatcher_failures_total{kind="transient",service="usage"}'
    assert f"{failures} 1.0" in metrics.render().decode()
    assert len(await stored_models(repository)) == 20


# -- file permissions -----------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run the test with umask 0, the most permissive an operator can have."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
async def test_database_and_event_files_are_private_whatever_the_umask(
    start_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    data = tmp_path / "state" / "deep"
    proxy: Client = await start_proxy(
        DATABASE_URL=f"sqlite:///{data / 'proxy.db'}",
        FILE_EVENT_LOG=str(tmp_path / "logs" / "events.jsonl"),
        DEAD_LETTER_DIR=str(tmp_path / "dead"),
    )
    _, token = await proxy_token(proxy)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    response = await proxy.post(
        "/v1/chat/completions", json=body, headers=bearer(token)
    )
    assert response.status == 200
    await settle(proxy, 1)
    files = [data / "proxy.db", data / "proxy.db-wal", data / "proxy.db-shm"]
    await eventually((tmp_path / "logs" / "events.jsonl").exists)
    files.append(tmp_path / "logs" / "events.jsonl")
    for path in files:
        assert mode_of(path) == 0o600, (path, oct(mode_of(path)))
    for folder in (tmp_path / "state", data, tmp_path / "logs"):
        assert mode_of(folder) == 0o700, (folder, oct(mode_of(folder)))


@pytest.mark.usefixtures("open_umask")
async def test_rotated_logs_and_dead_letters_are_private(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "new" / "events.jsonl", max_bytes=400, backups=2)
    await backend.start()
    for n in range(6):
        result = await backend.send([call_event(n)])
        assert not result.retry
    log_files = sorted((tmp_path / "new").iterdir())
    assert [p.name for p in log_files] == [
        "events.jsonl",
        "events.jsonl.1",
        "events.jsonl.2",
    ]
    dead = DeadLetterFile(tmp_path / "dl" / "dead-letter-file.jsonl")
    await dead.append("file", [(call_event(0), "refused")])
    for path in [*log_files, dead.path]:
        assert mode_of(path) == 0o600, (path, oct(mode_of(path)))
    for folder in (tmp_path / "new", tmp_path / "dl"):
        assert mode_of(folder) == 0o700, (folder, oct(mode_of(folder)))


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.usefixtures("open_umask")
async def test_event_spool_is_private(tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "event-spool.jsonl"
    bus = RedisEventBus(
        f"redis://127.0.0.1:{unused_port()}/0",
        spool_path=spool,
        flush_interval_s=0.01,
        timeout_s=1.0,
    )
    await bus.start()
    try:
        bus.publish(call_event(0))
        await eventually(lambda: bus.stats.spooled > 0)
        assert mode_of(spool) == 0o600, oct(mode_of(spool))
        assert mode_of(spool.parent) == 0o700, oct(mode_of(spool.parent))
    finally:
        await bus.close()


@pytest.mark.usefixtures("open_umask")
async def test_existing_files_keep_the_mode_an_operator_gave_them(
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "events.jsonl"
    log_file.touch()
    log_file.chmod(0o640)  # e.g. readable by a log shipper's group
    backend = FileBackend(log_file)
    await backend.start()
    assert not (await backend.send([call_event(0)])).retry
    assert mode_of(log_file) == 0o640 and log_file.read_bytes().count(b"\n") == 1
    database = tmp_path / "proxy.db"
    repository = SqliteRepository(database)
    await repository.connect()
    await repository.close()
    database.chmod(0o640)
    await repository.connect()
    await repository.migrate()
    await repository.close()
    assert mode_of(database) == 0o640
