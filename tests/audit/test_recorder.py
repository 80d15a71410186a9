"""The audit recorder and the audit JSONL file behind a real dispatcher, on the memory
bus and a real SQLite file: batches land, a busy database is retried, refused rows are
set aside alone, and what cannot be written is dead-lettered, counted and logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from llm_proxy.accounting.metrics import Metrics
from llm_proxy.audit.file import AuditFileBackend
from llm_proxy.audit.recorder import AuditRecorder, audit_row
from llm_proxy.backoff import RetryPolicy
from llm_proxy.dispatchers.base import Backend, DeadLetterFile, Dispatcher
from llm_proxy.events.audit import AuditRecorded
from llm_proxy.events.memory_bus import InMemoryEventBus
from llm_proxy.storage import AuditEvent, AuditFilter, RejectedRowsError
from llm_proxy.storage.sqlite import SqliteRepository


class FlakyRepository(SqliteRepository):
    """Fails the first `failures` inserts as a lost connection would; refuses rows
    whose reason is `refuse` as bad data would."""

    def __init__(self, path: Path, failures: int = 0) -> None:
        super().__init__(path)
        self.failures = failures
        self.attempts = 0

    async def insert_audit_events(self, events: Sequence[AuditEvent]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("database went away")
        if any(event.reason == "refuse" for event in events):
            raise RejectedRowsError("the row is bad")
        await super().insert_audit_events(events)


def record(n: int, **fields: str) -> AuditRecorded:
    return AuditRecorded(
        action="token.revoke", actor="management_api", outcome="success",
        token_id=f"token-{n}", **fields,
    )  # fmt: skip


async def no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


async def deliver(
    backend: Backend[AuditRecorded],
    records: list[AuditRecorded],
    dead_letters: Path,
    metrics: Metrics | None = None,
) -> Dispatcher[AuditRecorded]:
    """Publish `records`, close the bus and let the dispatcher drain it."""
    bus = InMemoryEventBus[AuditRecorded](batch_size=10, flush_interval_s=0.01)
    dispatcher = Dispatcher(
        backend,
        bus.subscribe("audit"),
        DeadLetterFile(dead_letters),
        retry=RetryPolicy(3, 0.0, 0.0),
        metrics=metrics,
        sleep=no_sleep,
    )
    task = asyncio.create_task(dispatcher.run())
    for item in records:
        bus.publish(item)
    await bus.close()
    await asyncio.wait_for(task, 5)
    return dispatcher


@pytest.fixture
async def repository(tmp_path: Path) -> FlakyRepository:
    repo = FlakyRepository(tmp_path / "proxy.db")
    await repo.connect()
    await repo.migrate()
    return repo


async def stored(repository: SqliteRepository) -> list[AuditEvent]:
    return await repository.list_audit_events(AuditFilter(), limit=100, offset=0)


async def test_recorder_writes_every_record_as_a_row(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    records = [record(n) for n in range(25)]
    dispatcher = await deliver(AuditRecorder(repository), records, tmp_path / "dl")
    rows = await stored(repository)
    assert sorted(r.id for r in rows) == sorted(r.event_id for r in records)
    assert rows[0] == audit_row(records[-1])
    assert dispatcher.delivered == 25 and dispatcher.dead_lettered == 0
    await repository.close()


async def test_recorder_retries_a_database_that_went_away(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    repository.failures = 2
    metrics = Metrics()
    records = [record(n) for n in range(3)]
    dispatcher = await deliver(
        AuditRecorder(repository), records, tmp_path / "dl", metrics
    )
    assert len(await stored(repository)) == 3
    assert dispatcher.dead_lettered == 0
    failures = metrics.registry.get_sample_value(
        "llm_proxy_dispatcher_failures_total",
        {"service": "audit", "kind": "transient"},
    )
    assert failures == 2
    await repository.close()


async def test_recorder_sets_aside_only_the_rows_the_database_refuses(
    repository: FlakyRepository, tmp_path: Path
) -> None:
    records = [record(1), record(2, reason="refuse"), record(3)]
    dead = tmp_path / "dl.jsonl"
    dispatcher = await deliver(AuditRecorder(repository), records, dead)
    assert {r.token_id for r in await stored(repository)} == {"token-1", "token-3"}
    letters = DeadLetterFile(dead).read()
    assert [entry["event"]["token_id"] for entry in letters] == ["token-2"]
    assert dispatcher.dead_lettered == 1
    await repository.close()


async def test_recorder_dead_letters_counts_and_logs_what_never_got_written(
    repository: FlakyRepository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository.failures = 100
    metrics = Metrics()
    dead = tmp_path / "dl.jsonl"
    with caplog.at_level(logging.ERROR):
        await deliver(AuditRecorder(repository), [record(1)], dead, metrics)
    assert await stored(repository) == []
    assert [e["event"]["token_id"] for e in DeadLetterFile(dead).read()] == ["token-1"]
    dead_lettered = metrics.registry.get_sample_value(
        "llm_proxy_dispatcher_events_total",
        {"service": "audit", "outcome": "dead_lettered"},
    )
    assert dead_lettered == 1
    assert "dispatcher audit dead-lettered 1 events" in caplog.text
    await repository.close()


async def test_audit_file_gets_one_json_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    records = [record(n, reason="No token.") for n in range(3)]
    await deliver(AuditFileBackend(path), records, tmp_path / "dl")
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["event_id"] for line in lines] == [r.event_id for r in records]
    assert lines[0]["type"] == "audit" and lines[0]["reason"] == "No token."
    assert path.stat().st_mode & 0o777 == 0o600
