"""The audit table on both databases: idempotent batches, filters, pages, retention."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llm_proxy.accounting.metrics import Metrics
from llm_proxy.config import RetentionSettings
from llm_proxy.ops.retention import Purger, RetentionJob
from llm_proxy.storage import AuditEvent, AuditFilter, Repository
from llm_proxy.storage.migrations import SQL_DIR, load_migrations

from ..storage.test_repository import new_repository, repository

__all__ = ["new_repository", "repository"]  # fixtures used by the tests below

NOW = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def row(minutes_ago: int = 0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "ts": NOW - minutes_ago * MINUTE,
        "action": "project.create",
        "actor": "management_api",
        "outcome": "success",
        "client_ip": "203.0.113.7",
        "request_id": "req-1",
        "project_id": str(uuid.uuid4()),
        "token_id": None,
        "reason": None,
        "metadata": {"fields": ["name"], "count": 2},
        **fields,
    }
    return AuditEvent(**values)


def test_migration_009_is_the_audit_table_in_both_dialects() -> None:
    for dialect in ("sqlite", "postgres"):
        names = {m.version: m.name for m in load_migrations(SQL_DIR, dialect)}
        assert names[9] == "audit"


async def test_audit_rows_round_trip_and_a_batch_again_adds_nothing(
    repository: Repository,
) -> None:
    batch = [row(2), row(1, token_id=str(uuid.uuid4()), reason="No project.")]
    await repository.insert_audit_events(batch)
    await repository.insert_audit_events(batch)  # redelivered: idempotent on id
    assert await repository.count_audit_events(AuditFilter()) == 2
    for stored in batch:
        assert await repository.get_audit_event(stored.id) == stored
    assert await repository.get_audit_event("no-such-id") is None
    assert await repository.get_audit_event(str(uuid.uuid4())) is None


async def test_audit_listing_is_newest_first_and_paged(repository: Repository) -> None:
    rows = [row(minutes) for minutes in range(7)]
    await repository.insert_audit_events(rows)
    everything = AuditFilter()
    first = await repository.list_audit_events(everything, limit=3, offset=0)
    rest = await repository.list_audit_events(everything, limit=10, offset=3)
    assert [r.id for r in first + rest] == [r.id for r in rows]
    assert await repository.list_audit_events(everything, limit=3, offset=7) == []


async def test_audit_filters_each_match_only_their_rows(repository: Repository) -> None:
    project, token = str(uuid.uuid4()), str(uuid.uuid4())
    wanted = {
        "action": row(1, action="token.revoke"),
        "actor": row(2, actor="operator"),
        "project_id": row(3, project_id=project),
        "token_id": row(4, token_id=token),
        "outcome": row(5, outcome="denied"),
    }
    await repository.insert_audit_events([row(0), *wanted.values()])
    filters = {
        "action": "token.revoke",
        "actor": "operator",
        "project_id": project,
        "token_id": token,
        "outcome": "denied",
    }
    for name, value in filters.items():
        audit_filter = AuditFilter(**{name: value})
        found = await repository.list_audit_events(audit_filter, limit=10, offset=0)
        assert found == [wanted[name]], name
        assert await repository.count_audit_events(audit_filter) == 1


async def test_audit_time_range_includes_its_start_and_excludes_its_end(
    repository: Repository,
) -> None:
    rows = [row(minutes) for minutes in range(5)]
    await repository.insert_audit_events(rows)
    window = AuditFilter(since=rows[3].ts, until=rows[1].ts)
    found = await repository.list_audit_events(window, limit=10, offset=0)
    assert found == [rows[2], rows[3]]
    other_zone = rows[3].ts.astimezone(datetime.now().astimezone().tzinfo)
    assert await repository.count_audit_events(AuditFilter(since=other_zone)) == 4


async def test_audit_purge_takes_the_oldest_before_the_cutoff_in_batches(
    repository: Repository,
) -> None:
    rows = [row(60 * 24 * days) for days in (0, 400, 401, 402)]
    await repository.insert_audit_events(rows)
    cutoff = NOW - timedelta(days=365)
    assert await repository.count_old_audit_events(before=cutoff) == 3
    assert await repository.purge_audit_events(before=cutoff, limit=2) == 2
    left = await repository.list_audit_events(AuditFilter(), limit=10, offset=0)
    assert [r.id for r in left] == [rows[0].id, rows[1].id]
    assert await repository.purge_audit_events(before=cutoff, limit=2) == 1
    assert await repository.count_old_audit_events(before=cutoff) == 0


async def test_audit_text_without_nul_is_stored_alike_on_both(
    repository: Repository,
) -> None:
    stored = row(reason="bad \x00 input", metadata={"surface": "admin"})
    await repository.insert_audit_events([stored])
    found = await repository.get_audit_event(stored.id)
    assert found is not None and found.reason == "bad \ufffd input"


async def test_audit_listing_refuses_negative_paging(repository: Repository) -> None:
    with pytest.raises(ValueError):
        await repository.list_audit_events(AuditFilter(), limit=-1, offset=0)


async def test_retention_purges_audit_rows_past_audit_retention_days(
    repository: Repository,
) -> None:
    now = datetime.now(UTC)
    old, recent = row(ts=now - timedelta(days=400)), row(ts=now - timedelta(days=10))
    await repository.insert_audit_events([old, recent])
    purger = Purger(repository, RetentionSettings(audit_days=365))
    cutoffs, counts = await purger.preview()
    assert cutoffs.audit_before is not None and counts.audit_events == 1
    metrics = Metrics()
    report = await RetentionJob(purger, 3600.0, metrics=metrics).run_once()
    assert report is not None and report.deleted.audit_events == 1
    assert await repository.get_audit_event(old.id) is None
    assert await repository.get_audit_event(recent.id) == recent
    sample = {"table": "audit_events"}
    purged = metrics.registry.get_sample_value(
        "llm_proxy_retention_purged_rows_total", sample
    )
    assert purged == 1
    kept = Purger(repository, RetentionSettings(audit_days=None))
    assert (await kept.preview())[0].audit_before is None
