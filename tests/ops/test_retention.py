"""Retention: which rows the purge deletes, the purge lock, the schedule, `db purge`.

Repository tests run on a real SQLite file and on the real PostgreSQL server (the
`new_repository` fixture of test_repository); the acceptance test (purging 10,000
tokens and 100,000 usage events while the proxy serves) is in test_retention_load.py.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from llm_proxy.accounting.metrics import Metrics
from llm_proxy.cli import main
from llm_proxy.config import ConfigError, RetentionSettings, Settings
from llm_proxy.ops.retention import (
    SCHEMA_VERSION,
    Cutoffs,
    Purger,
    PurgeReport,
    RetentionJob,
    cutoffs_at,
    format_cutoff,
)
from llm_proxy.storage import (
    PostgresRepository,
    PurgeCounts,
    Repository,
    SqliteRepository,
    TokenFilter,
)
from llm_proxy.storage.migrations import SQL_DIR

from ..storage.test_repository import (
    NewRepository,
    _postgres_admin,
    _postgres_url,
    add_project,
    add_token,
    make_event,
    new_repository,
    repository,
)
from ..support import MANAGEMENT_TOKEN

__all__ = ["new_repository", "repository"]  # fixtures used by the tests below

DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
MICROSECOND = timedelta(microseconds=1)


def now() -> datetime:
    return datetime.now(UTC)


async def alive_ids(repository: Repository) -> set[str]:
    tokens = await repository.list_tokens(
        TokenFilter(), now=now(), limit=1000, offset=0
    )
    return {token.id for token in tokens}


async def deleted_ids(repository: Repository, mark: int) -> set[str]:
    page = await repository.load_deletions_since(mark, limit=1000)
    return {deletion.id for deletion in page.rows if deletion.kind == "token"}


# -- which tokens go ------------------------------------------------------------------


async def test_purge_tokens_takes_those_expired_or_revoked_before_the_cutoff(
    repository: Repository,
) -> None:
    cutoff = now() - 30 * DAY
    project = await add_project(repository)
    inactive = await add_project(repository, "inactive", is_active=False)
    keep = {
        "active": await add_token(repository, project, expires_at=now() + DAY),
        "expired at the cutoff": await add_token(
            repository, project, expires_at=cutoff
        ),
        "expired after the cutoff": await add_token(
            repository, project, expires_at=cutoff + SECOND
        ),
        "revoked now, expires later": await add_token(
            repository, project, expires_at=now() + DAY
        ),
        "of an inactive project": await add_token(
            repository, inactive, expires_at=now() + DAY
        ),
    }
    await repository.revoke_token(keep["revoked now, expires later"].id)
    go = {
        "expired before the cutoff": await add_token(
            repository, project, expires_at=cutoff - MICROSECOND
        ),
        "expired long ago, revoked now": await add_token(
            repository, project, expires_at=cutoff - 300 * DAY
        ),
    }
    await repository.revoke_token(go["expired long ago, revoked now"].id)
    mark = await repository.change_mark()

    counts = await repository.count_purgeable(tokens_before=cutoff, usage_before=None)
    assert counts == PurgeCounts(tokens=2, usage_events=0)
    assert await repository.purge_tokens(before=cutoff, limit=1000) == 2

    assert await alive_ids(repository) == {token.id for token in keep.values()}
    # Tombstones: the other processes' token tables drop what was purged.
    assert await deleted_ids(repository, mark) == {token.id for token in go.values()}
    assert await repository.count_projects() == 2  # projects are never purged
    assert await repository.purge_tokens(before=cutoff, limit=1000) == 0


async def test_revoked_tokens_go_once_their_revocation_is_older_than_the_cutoff(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    revoked = await add_token(repository, project, expires_at=now() + DAY)
    born_revoked = await add_token(
        repository, project, expires_at=now() + DAY, is_active=False
    )
    active = await add_token(repository, project, expires_at=now() + DAY)
    await repository.revoke_token(revoked.id)
    # The revocation is dated by the database at the moment it happened: a cut-off
    # just before it keeps the tokens, one just after takes them.
    before_revocation = now() - 5 * SECOND
    after_revocation = now() + 5 * SECOND
    assert await repository.purge_tokens(before=before_revocation, limit=10) == 0
    counts = await repository.count_purgeable(
        tokens_before=after_revocation, usage_before=None
    )
    assert counts.tokens == 2
    assert await repository.purge_tokens(before=after_revocation, limit=10) == 2
    assert await alive_ids(repository) == {active.id}
    assert born_revoked.id not in await alive_ids(repository)


async def test_revoking_again_keeps_the_first_revocation_date(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project, expires_at=now() + DAY)
    await repository.revoke_token(token.id)
    first = await revoked_at(repository, token.id)
    await asyncio.sleep(0.01)
    await repository.revoke_token(token.id)
    await repository.revoke_project_tokens(project.id)
    assert await revoked_at(repository, token.id) == first
    active = await add_token(repository, project, expires_at=now() + DAY)
    assert await revoked_at(repository, active.id) is None


async def revoked_at(repository: Repository, token_id: str) -> datetime | None:
    """The token's revocation date as stored (the `Token` record does not carry it)."""
    if isinstance(repository, SqliteRepository):
        sql = "SELECT revoked_at FROM tokens WHERE id = ?"
        text = await repository._scalar(sql, (token_id,))
        return None if text is None else datetime.fromisoformat(text)
    assert isinstance(repository, PostgresRepository)
    sql = "SELECT revoked_at FROM tokens WHERE id = $1"
    value: datetime | None = await repository._connected.fetchval(
        sql, uuid.UUID(token_id)
    )
    return value


async def test_the_migration_dates_tokens_revoked_before_it(
    new_repository: NewRepository, tmp_path: Path
) -> None:
    older = tmp_path / "sql-before-retention"
    shutil.copytree(SQL_DIR, older)
    for dialect in ("sqlite", "postgres"):
        for path in (older / dialect).glob(f"{SCHEMA_VERSION:03d}_*.sql"):
            path.unlink()
    before = new_repository(older)
    await before.connect()
    await before.migrate()
    project = await add_project(before)
    token = await add_token(before, project, expires_at=now() + DAY)
    await before.revoke_token(token.id)
    await before.close()

    after = new_repository()
    await after.connect()
    assert await after.migrate() == [SCHEMA_VERSION]
    dated = await revoked_at(after, token.id)
    assert dated is not None and abs(dated - now()) < timedelta(minutes=1)


async def test_a_token_batch_deletes_at_most_its_limit(repository: Repository) -> None:
    project = await add_project(repository)
    for _ in range(5):
        await add_token(repository, project, expires_at=now() - 40 * DAY)
    cutoff = now() - 30 * DAY
    assert await repository.purge_tokens(before=cutoff, limit=2) == 2
    assert await repository.purge_tokens(before=cutoff, limit=2) == 2
    assert await repository.purge_tokens(before=cutoff, limit=2) == 1


# -- which usage events go ------------------------------------------------------------


async def test_purge_usage_events_takes_those_before_the_cutoff_oldest_first(
    repository: Repository,
) -> None:
    cutoff = now() - 90 * DAY
    stamps = {
        "oldest": cutoff - 10 * DAY,
        "older": cutoff - DAY,
        "just before": cutoff - MICROSECOND,
        "at the cutoff": cutoff,
        "after": cutoff + MICROSECOND,
        "today": now(),
    }
    await repository.insert_usage_events(
        [make_event(ts=ts, event_id=name) for name, ts in stamps.items()]
    )
    counts = await repository.count_purgeable(tokens_before=None, usage_before=cutoff)
    assert counts == PurgeCounts(tokens=0, usage_events=3)
    assert await repository.purge_usage_events(before=cutoff, limit=2) == 2
    left = {event.event_id for event in await repository.recent_usage_events(10)}
    assert left == {"just before", "at the cutoff", "after", "today"}
    assert await repository.purge_usage_events(before=cutoff, limit=2) == 1
    left = {event.event_id for event in await repository.recent_usage_events(10)}
    assert left == {"at the cutoff", "after", "today"}


# -- the purge lock -------------------------------------------------------------------


async def test_purge_lock_is_held_by_one_process_at_a_time(
    new_repository: NewRepository,
) -> None:
    first, second = new_repository(), new_repository()
    for each in (first, second):
        await each.connect()
        await each.migrate()
    async with first.purge_lock(lease_s=60) as held:
        assert held
        async with second.purge_lock(lease_s=60) as also:
            assert not also
    async with second.purge_lock(lease_s=60) as held:
        assert held  # released at the end of the first block


async def test_sqlite_purge_lease_of_a_dead_holder_expires(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    first, second = SqliteRepository(path), SqliteRepository(path)
    try:
        for each in (first, second):
            await each.connect()
        await first.migrate()
        async with first.purge_lock(lease_s=0.05) as held:
            assert held
            await asyncio.sleep(0.1)  # the holder hangs past its lease
            async with second.purge_lock(lease_s=60) as taken_over:
                assert taken_over
    finally:
        await first.close()
        await second.close()


@pytest.mark.postgres
async def test_postgres_purge_lock_holds_back_no_vacuum() -> None:
    """The lock's transaction stays open during a run, but keeps no snapshot."""
    repository = PostgresRepository(_postgres_url(), pool_max_size=1)
    await repository.connect()
    admin = await _postgres_admin()
    try:
        async with repository.purge_lock(lease_s=60) as held:
            assert held
            await repository.ping()  # the lock takes no connection of the pool
            row = await admin.fetchrow(
                "SELECT a.state, a.backend_xmin FROM pg_locks l"
                " JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted"
                " AND l.objid = ($1::bigint & 4294967295)::oid",
                0x6C6C6D5F70757267,
            )
            assert row is not None
            assert row["state"] == "idle in transaction"
            assert row["backend_xmin"] is None
    finally:
        await admin.close()
        await repository.close()


async def test_two_concurrent_purgers_one_runs_the_other_skips(
    new_repository: NewRepository,
) -> None:
    first, second = new_repository(), new_repository()
    for each in (first, second):
        await each.connect()
        await each.migrate()
    old = now() - 100 * DAY
    await first.insert_usage_events(
        [make_event(ts=old, event_id=f"old-{n}") for n in range(40)]
    )
    settings = RetentionSettings(token_days=None, usage_days=90)
    purgers = [
        Purger(each, settings, usage_batch_rows=4, pause_s=0.02)
        for each in (first, second)
    ]
    reports = await asyncio.gather(*(purger.run() for purger in purgers))
    ran = [report for report in reports if report is not None]
    assert len(ran) == 1, reports
    assert ran[0].deleted == PurgeCounts(tokens=0, usage_events=40)
    assert ran[0].complete
    assert await first.count_purgeable(tokens_before=None, usage_before=now()) == (
        PurgeCounts(tokens=0, usage_events=0)
    )


# -- the purger -----------------------------------------------------------------------


async def test_preview_counts_and_changes_nothing(repository: Repository) -> None:
    project = await add_project(repository)
    await add_token(repository, project, expires_at=now() - 31 * DAY)
    await add_token(repository, project, expires_at=now() + DAY)
    await repository.insert_usage_events(
        [make_event(ts=now() - 91 * DAY), make_event(ts=now())]
    )
    purger = Purger(repository, RetentionSettings())
    cutoffs, counts = await purger.preview()
    assert counts == PurgeCounts(tokens=1, usage_events=1)
    assert cutoffs.tokens_before is not None and cutoffs.usage_before is not None
    assert abs(cutoffs.tokens_before - (now() - 30 * DAY)) < timedelta(minutes=1)
    assert abs(cutoffs.usage_before - (now() - 90 * DAY)) < timedelta(minutes=1)
    assert (await purger.preview())[1] == counts  # still there
    assert len(await alive_ids(repository)) == 2

    report = await purger.run()
    assert report is not None and report.complete
    assert report.deleted == counts
    assert (await purger.preview())[1] == PurgeCounts()


async def test_a_kind_with_retention_off_is_kept(repository: Repository) -> None:
    project = await add_project(repository)
    await add_token(repository, project, expires_at=now() - 3000 * DAY)
    await repository.insert_usage_events([make_event(ts=now() - 3000 * DAY)])
    only_usage = Purger(repository, RetentionSettings(token_days=None))
    report = await only_usage.run()
    assert report is not None
    assert report.deleted == PurgeCounts(tokens=0, usage_events=1)
    assert len(await alive_ids(repository)) == 1
    off = RetentionSettings(token_days=None, usage_days=None, audit_days=None)
    report = await Purger(repository, off).run()
    assert report == PurgeReport(Cutoffs(None, None), PurgeCounts(), 0.0, True)


async def test_a_run_stops_at_its_time_bound_and_the_next_one_goes_on(
    repository: Repository,
) -> None:
    await repository.insert_usage_events(
        [make_event(ts=now() - 100 * DAY) for _ in range(10)]
    )
    settings = RetentionSettings(token_days=None)
    bounded = Purger(repository, settings, max_run_s=0, usage_batch_rows=3)
    report = await bounded.run()
    assert report is not None and not report.complete
    assert report.deleted.usage_events == 3  # one batch, then the bound
    report = await Purger(repository, settings, usage_batch_rows=3).run()
    assert report is not None and report.complete
    assert report.deleted.usage_events == 7


async def test_stop_ends_a_run_after_its_current_batch(repository: Repository) -> None:
    await repository.insert_usage_events(
        [make_event(ts=now() - 100 * DAY) for _ in range(10)]
    )
    purger = Purger(
        repository, RetentionSettings(token_days=None), usage_batch_rows=2, pause_s=60
    )
    run = asyncio.create_task(purger.run())
    await asyncio.sleep(0.2)  # the first batch is done; the pause has begun
    purger.stop()
    report = await asyncio.wait_for(run, 5)
    assert report is not None and not report.complete
    assert report.deleted.usage_events == 2


def test_cutoffs_and_their_format() -> None:
    moment = datetime(2025, 3, 31, 12, 0, 0, 999, tzinfo=UTC)
    settings = RetentionSettings(token_days=30, usage_days=None, audit_days=None)
    cutoffs = cutoffs_at(settings, moment)
    assert cutoffs == Cutoffs(datetime(2025, 3, 1, 12, 0, 0, 999, tzinfo=UTC), None)
    assert cutoffs.any and not Cutoffs(None, None).any
    assert format_cutoff(cutoffs.tokens_before) == "2025-03-01T12:00:00Z"
    assert format_cutoff(None) == "never"


# -- the schedule ---------------------------------------------------------------------


class _FakePurger:
    """Answers `run` from a script: a report, None (lock held) or an exception."""

    def __init__(self, *outcomes: PurgeReport | None | Exception) -> None:
        self.outcomes = list(outcomes)
        self.runs = 0
        self.stopped = False

    async def run(self) -> PurgeReport | None:
        self.runs += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def stop(self) -> None:
        self.stopped = True


def _report(tokens: int, usage_events: int, complete: bool = True) -> PurgeReport:
    return PurgeReport(
        Cutoffs(now(), now()), PurgeCounts(tokens, usage_events), 0.5, complete
    )


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_job_runs_count_outcomes_and_rows_in_the_metrics() -> None:
    metrics = Metrics()
    done, partial = _report(3, 40), _report(1, 5, complete=False)
    fake = _FakePurger(done, None, RuntimeError("database down"), partial)
    job = RetentionJob(fake, 3600, metrics=metrics)  # type: ignore[arg-type]
    assert await job.run_once() == done
    assert await job.run_once() is None  # another process held the lock
    assert await job.run_once() is None  # failed: logged, not raised
    assert await job.run_once() == partial
    assert job.last_report == partial
    runs = "llm_proxy_retention_purge_runs_total"
    for outcome in ("done", "skipped", "failed", "partial"):
        assert _sample(metrics, runs, outcome=outcome) == 1
    rows = "llm_proxy_retention_purged_rows_total"
    assert _sample(metrics, rows, table="tokens") == 4
    assert _sample(metrics, rows, table="usage_events") == 45


def test_job_delays_are_jittered_and_the_first_comes_within_minutes() -> None:
    low = RetentionJob(_FakePurger(), 3600, uniform=lambda a, b: a)  # type: ignore[arg-type]
    high = RetentionJob(_FakePurger(), 3600, uniform=lambda a, b: b)  # type: ignore[arg-type]
    assert (low.first_delay_s(), high.first_delay_s()) == (150.0, 300.0)
    assert (low.next_delay_s(), high.next_delay_s()) == pytest.approx((3240, 3960))
    short = RetentionJob(_FakePurger(), 2, uniform=lambda a, b: b)  # type: ignore[arg-type]
    assert short.first_delay_s() == 2.0  # never later than one interval


async def test_job_runs_on_its_schedule_and_closes_at_once_between_runs() -> None:
    fake = _FakePurger(_report(1, 1), _report(2, 2))
    job = RetentionJob(fake, 0.05, uniform=lambda a, b: a)  # type: ignore[arg-type]
    job.start()
    job.start()  # a second start is a no-op
    for _ in range(100):
        if fake.runs >= 2:
            break
        await asyncio.sleep(0.01)
    assert fake.runs >= 2
    started = asyncio.get_running_loop().time()
    await job.close()
    assert asyncio.get_running_loop().time() - started < 1
    assert fake.stopped
    await job.close()  # a second close is a no-op


async def test_job_close_lets_a_run_in_progress_finish_its_batch() -> None:
    gate = asyncio.Event()
    finished: list[bool] = []

    class _Slow(_FakePurger):
        async def run(self) -> PurgeReport | None:
            self.runs += 1
            await gate.wait()
            finished.append(True)
            return _report(1, 1)

        def stop(self) -> None:
            gate.set()  # the run notices the stop after its batch

    job = RetentionJob(_Slow(), 0.01, uniform=lambda a, b: a)  # type: ignore[arg-type]
    job.start()
    await asyncio.sleep(0.1)
    await job.close()
    assert finished == [True]
    assert job.last_report is not None


# -- settings -------------------------------------------------------------------------


def _settings(**env: str) -> Settings:
    return Settings.from_env({"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, **env})


def test_retention_settings_defaults_and_off() -> None:
    assert _settings().retention == RetentionSettings(30, 90, 3600.0)
    off = _settings(
        TOKEN_RETENTION_DAYS="0", USAGE_RETENTION_DAYS="off", PURGE_INTERVAL="off"
    )
    assert off.retention == RetentionSettings(None, None, None)
    custom = _settings(
        TOKEN_RETENTION_DAYS="7", USAGE_RETENTION_DAYS="365", PURGE_INTERVAL="600"
    )
    assert custom.retention == RetentionSettings(7, 365, 600.0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TOKEN_RETENTION_DAYS", "-1", "TOKEN_RETENTION_DAYS must be a whole number"),
        ("TOKEN_RETENTION_DAYS", "1.5", "got '1.5'"),
        ("USAGE_RETENTION_DAYS", "36501", "from 1 to 36500"),
        ("USAGE_RETENTION_DAYS", "ninety", "USAGE_RETENTION_DAYS must be"),
        ("PURGE_INTERVAL", "-5", "PURGE_INTERVAL must be > 0 seconds"),
        ("PURGE_INTERVAL", "hourly", "PURGE_INTERVAL must be a number of seconds"),
    ],
)
def test_bad_retention_settings_fail_naming_the_setting(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(**{name: value})


# -- `llm-proxy db purge` -------------------------------------------------------------


def _invoke(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=True)


def _seed_sqlite(path: Path) -> dict[str, str]:
    """A migrated SQLite database with 2 dead tokens, 1 live one, 3 old events."""
    env = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "DATABASE_URL": f"sqlite:///{path}"}
    assert _invoke(["db", "migrate"], env).exit_code == 0

    async def seed() -> None:
        repository = SqliteRepository(path)
        await repository.connect()
        try:
            project = await add_project(repository)
            for days in (31, 400, -1):
                await add_token(repository, project, expires_at=now() - days * DAY)
            events = [make_event(ts=now() - days * DAY) for days in (91, 92, 93, 1)]
            await repository.insert_usage_events(events)
        finally:
            await repository.close()

    asyncio.run(seed())
    return env


def _rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


def test_db_purge_dry_run_shows_what_would_go_and_changes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "proxy.db"
    env = _seed_sqlite(path)
    result = _invoke(["db", "purge", "--dry-run"], env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tokens:       2 expired or revoked before 20")
    assert lines[0].endswith("Z (TOKEN_RETENTION_DAYS=30)")
    assert lines[1].startswith("usage events: 3 older than 20")
    assert lines[1].endswith("Z (USAGE_RETENTION_DAYS=90)")
    assert lines[2].startswith("audit events: 0 older than 20")
    assert lines[2].endswith("Z (AUDIT_RETENTION_DAYS=365)")
    assert lines[3] == "dry run: nothing deleted"
    assert (_rows(path, "tokens"), _rows(path, "usage_events")) == (3, 4)


def test_db_purge_deletes_now(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    env = _seed_sqlite(path)
    result = _invoke(["db", "purge"], {**env, "USAGE_RETENTION_DAYS": "off"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == "usage events: kept forever (USAGE_RETENTION_DAYS=off)"
    assert lines[3].startswith("deleted 2 tokens, 0 usage events and 0 audit events")
    assert (_rows(path, "tokens"), _rows(path, "usage_events")) == (1, 4)
    again = _invoke(["db", "purge"], env)
    assert again.stdout.splitlines()[3].startswith("deleted 0 tokens, 3 usage")


def test_db_purge_with_retention_off_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    env = _seed_sqlite(path)
    days = ("TOKEN_RETENTION_DAYS", "USAGE_RETENTION_DAYS", "AUDIT_RETENTION_DAYS")
    off = {**env, **dict.fromkeys(days, "0")}
    result = _invoke(["db", "purge"], off)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[3] == "retention is off: nothing to delete"
    assert (_rows(path, "tokens"), _rows(path, "usage_events")) == (3, 4)


def test_db_purge_fails_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    env = _seed_sqlite(path)
    lease = "9999-12-31T00:00:00.000000Z|another-process"
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('purge_lock', ?)", (lease,))
    result = _invoke(["db", "purge"], env)
    assert result.exit_code == 1
    assert result.stderr == (
        "error: another process is purging right now (it holds the purge lock)\n"
    )
    assert _rows(path, "tokens") == 3


def test_db_purge_refuses_a_missing_file_or_an_old_schema(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    env = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "DATABASE_URL": f"sqlite:///{missing}"}
    result = _invoke(["db", "purge", "--dry-run"], env)
    assert result.exit_code == 1
    assert "error: no database at" in result.stderr
    assert not missing.exists()

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    env["DATABASE_URL"] = f"sqlite:///{empty}"
    result = _invoke(["db", "purge"], env)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: the database schema is version 0; the purge needs {SCHEMA_VERSION} "
        "(apply it with `llm-proxy db migrate`)\n"
    )


def test_db_purge_needs_no_management_token(tmp_path: Path) -> None:
    path = tmp_path / "proxy.db"
    _seed_sqlite(path)
    url = f"sqlite:///{path}"
    result = _invoke(["db", "purge", "--dry-run", "--database-url", url], {})
    assert result.exit_code == 0, result.output


async def test_job_close_cancels_a_run_that_does_not_stop_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("llm_proxy.ops.retention.STOP_TIMEOUT_S", 0.05)
    cancelled: list[bool] = []

    class _Stuck(_FakePurger):
        async def run(self) -> PurgeReport | None:
            try:
                await asyncio.sleep(60)  # ignores stop()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return None

    job = RetentionJob(_Stuck(), 0.01, uniform=lambda a, b: a)  # type: ignore[arg-type]
    job.start()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(job.close(), 5)
    assert cancelled == [True]
