"""Repository behaviour, run against every backend through one parametrised fixture."""

from __future__ import annotations

import ast
import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import llm_proxy.storage
from llm_proxy.storage import (
    DuplicateNameError,
    MigrationError,
    PostgresRepository,
    Project,
    ProjectChanges,
    RejectedRowsError,
    Repository,
    RepositoryError,
    RevokeCounts,
    SqliteRepository,
    Token,
    TokenFilter,
    TokenUsage,
    UsageEvent,
    UsageRow,
    UsageTotals,
    create_repository,
    postgres,
    sqlite,
)
from llm_proxy.storage._common import MAX_TEXT_CHARS
from llm_proxy.storage.migrations import SQL_DIR, load_migrations

from ..support import _postgres_admin, _postgres_schema, _postgres_url

NOW = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

NewRepository = Callable[..., Repository]


@pytest.fixture(params=BACKENDS)
async def new_repository(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[NewRepository]:
    """Unconnected repositories sharing one fresh database of the requested backend."""
    created: list[Repository] = []

    def remember(repository: Repository) -> Repository:
        created.append(repository)
        return repository

    if request.param == "sqlite":
        path = tmp_path / "data" / "proxy.db"
        yield lambda sql_dir=None: remember(SqliteRepository(path, sql_dir=sql_dir))
    else:
        async with _postgres_schema() as schema:
            yield lambda sql_dir=None: remember(
                PostgresRepository(
                    _postgres_url(), schema=schema, sql_dir=sql_dir, pool_max_size=3
                )
            )
            await asyncio.gather(*(repository.close() for repository in created))
    await asyncio.gather(*(repository.close() for repository in created))


@pytest.fixture
async def repository(new_repository: NewRepository) -> Repository:
    """A connected repository with the schema applied."""
    repository = new_repository()
    await repository.connect()
    await repository.migrate()
    return repository


def make_project(
    name: str = "alpha", *, created_at: datetime = NOW, **fields: Any
) -> Project:
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": name,
        "description": "",
        "metadata": {},
        "encrypted_api_key": "v1.nonce.ciphertext",
        "api_key_hint": "sk-...abcd",
        "is_active": True,
        "created_at": created_at,
        "updated_at": created_at,
    }
    return Project(**(values | fields))


def make_token(project: Project, *, created_at: datetime = NOW, **fields: Any) -> Token:
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "token_hash": secrets.token_hex(32),
        "token_hint": "wxyz",
        "project_id": project.id,
        "expires_at": NOW + HOUR,
        "is_active": True,
        "request_count": 0,
        "max_requests": None,
        "rate_limit_per_hour": None,
        "created_at": created_at,
        "last_used_at": None,
    }
    return Token(**(values | fields))


async def add_project(
    repository: Repository, name: str = "alpha", **fields: Any
) -> Project:
    project = make_project(name, **fields)
    await repository.create_project(project)
    return project


async def add_token(repository: Repository, project: Project, **fields: Any) -> Token:
    token = make_token(project, **fields)
    await repository.create_token(token)
    return token


# -- lifecycle and migrations ---------------------------------------------------------


def _shipped_versions() -> list[int]:
    return [m.version for m in load_migrations(SQL_DIR, "sqlite")]


async def test_repository_migrate_applies_schema_once(
    new_repository: NewRepository,
) -> None:
    repository = new_repository()
    await repository.connect()
    assert await repository.schema_version() == 0
    assert await repository.migrate() == _shipped_versions()
    assert await repository.migrate() == []
    assert await repository.schema_version() == _shipped_versions()[-1]


async def test_repository_concurrent_migrations_apply_schema_once(
    new_repository: NewRepository,
) -> None:
    first, second = new_repository(), new_repository()
    await asyncio.gather(first.connect(), second.connect())
    results = await asyncio.gather(first.migrate(), second.migrate())
    # each migration is applied exactly once, by whichever process got to it first
    applied = sorted(version for applied in results for version in applied)
    assert applied == _shipped_versions()
    last = _shipped_versions()[-1]
    assert await first.schema_version() == await second.schema_version() == last
    await add_project(second)  # the schema is usable from both
    assert await first.count_projects() == 1


def _write_migrations(sql_dir: Path, files: dict[str, str]) -> None:
    for dialect in ("sqlite", "postgres"):
        (sql_dir / dialect).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (sql_dir / dialect / name).write_text(text)


async def test_repository_failed_migration_rolls_back_and_raises(
    new_repository: NewRepository, tmp_path: Path
) -> None:
    sql_dir = tmp_path / "sql"
    _write_migrations(
        sql_dir,
        {
            "001_first.sql": "CREATE TABLE first_table (x INTEGER);",
            "002_broken.sql": "CREATE TABLE half (x INTEGER);\nSELECT * FROM missing;",
        },
    )
    repository = new_repository(sql_dir)
    await repository.connect()
    with pytest.raises(MigrationError, match="002_broken"):
        await repository.migrate()
    assert await repository.schema_version() == 1
    # `half` was rolled back, so creating it again succeeds.
    _write_migrations(sql_dir, {"002_broken.sql": "CREATE TABLE half (x INTEGER);"})
    assert await repository.migrate() == [2]


async def test_repository_methods_before_connect_raise(
    new_repository: NewRepository,
) -> None:
    repository = new_repository()
    with pytest.raises(RepositoryError, match="connect"):
        await repository.ping()
    await repository.close()  # closing an unconnected repository is harmless


async def test_repository_connect_and_close_are_idempotent(
    repository: Repository,
) -> None:
    await repository.connect()
    await repository.ping()
    await repository.close()
    await repository.close()
    with pytest.raises(RepositoryError):
        await repository.ping()


async def test_repository_meta_values_are_set_and_replaced(
    repository: Repository,
) -> None:
    assert await repository.get_meta("key_check") is None
    await repository.set_meta("key_check", "first")
    await repository.set_meta("key_check", "second")
    assert await repository.get_meta("key_check") == "second"


# -- projects -------------------------------------------------------------------------


async def test_repository_project_round_trips_with_metadata(
    repository: Repository,
) -> None:
    metadata = {"team": "ünïcode", "limits": {"daily": 10, "tags": ["a", None, 1.5]}}
    project = await add_project(
        repository, "x'); DROP TABLE projects; --", description="d", metadata=metadata
    )
    assert await repository.get_project(project.id) == project
    assert (await repository.load_projects_changed_since(0, limit=9)).rows == [project]


async def test_repository_get_project_unknown_returns_none(
    repository: Repository,
) -> None:
    assert await repository.get_project(str(uuid.uuid4())) is None
    assert await repository.get_project("not-a-uuid") is None


async def test_repository_duplicate_project_name_raises(repository: Repository) -> None:
    await add_project(repository, "alpha")
    with pytest.raises(DuplicateNameError):
        await add_project(repository, "alpha")


async def test_repository_list_projects_orders_and_pages(
    repository: Repository,
) -> None:
    late = await add_project(repository, "late", created_at=NOW + HOUR)
    early = [await add_project(repository, f"early{i}") for i in range(3)]
    early.sort(key=lambda project: project.id)  # same created_at: id breaks the tie
    expected = [*early, late]
    assert await repository.list_projects(limit=10, offset=0) == expected
    assert await repository.list_projects(limit=2, offset=1) == expected[1:3]
    assert await repository.list_projects(limit=10, offset=4) == []
    assert await repository.count_projects() == 4


async def test_repository_search_matches_name_substrings_literally(
    repository: Repository,
) -> None:
    await add_project(repository, "Billing-API")
    await add_project(repository, "100%_done")
    await add_project(repository, "1000 done")
    found = await repository.list_projects(limit=10, offset=0, search="billing")
    assert [project.name for project in found] == ["Billing-API"]
    found = await repository.list_projects(limit=10, offset=0, search="0%_")
    assert [project.name for project in found] == ["100%_done"]
    assert await repository.count_projects(search="done") == 2
    assert await repository.count_projects(search="nothing") == 0


async def test_repository_negative_paging_is_rejected(repository: Repository) -> None:
    with pytest.raises(ValueError, match="limit"):
        await repository.list_projects(limit=-1, offset=0)
    with pytest.raises(ValueError, match="offset"):
        await repository.list_tokens(TokenFilter(), now=NOW, limit=1, offset=-1)


async def test_repository_update_project_changes_only_given_fields(
    repository: Repository,
) -> None:
    project = await add_project(repository, metadata={"a": 1})
    later = NOW + HOUR
    changes = ProjectChanges(description="new", metadata={}, is_active=False)
    updated = await repository.update_project(project.id, changes, now=later)
    expected = replace(
        project, description="new", metadata={}, is_active=False, updated_at=later
    )
    assert updated == expected
    assert await repository.get_project(project.id) == expected
    changes = ProjectChanges(
        name="beta", encrypted_api_key="v1.other", api_key_hint="h"
    )
    updated = await repository.update_project(project.id, changes, now=later)
    assert updated is not None
    assert (updated.name, updated.encrypted_api_key, updated.api_key_hint) == (
        "beta",
        "v1.other",
        "h",
    )
    assert updated.description == "new"


async def test_repository_max_concurrent_is_stored_set_and_cleared(
    repository: Repository,
) -> None:
    project = await add_project(repository, max_concurrent=7)
    token = await add_token(repository, project, max_concurrent=3)
    assert await repository.get_project(project.id) == project
    projects = await repository.load_projects_changed_since(0, limit=10)
    assert projects.rows == [project]
    assert await repository.get_token(token.id) == token
    tokens = await repository.load_tokens_changed_since(0, limit=10)
    assert tokens.rows == [token]
    later = NOW + HOUR
    untouched = await repository.update_project(
        project.id, ProjectChanges(description="d"), now=later
    )
    assert untouched is not None and untouched.max_concurrent == 7
    raised = await repository.update_project(
        project.id, ProjectChanges(max_concurrent=20), now=later
    )
    assert raised is not None and raised.max_concurrent == 20
    cleared = await repository.update_project(
        project.id, ProjectChanges(clear_max_concurrent=True), now=later
    )
    assert cleared is not None and cleared.max_concurrent is None
    assert (await repository.get_project(project.id)) == cleared


async def test_repository_max_concurrent_below_one_is_refused(
    repository: Repository,
) -> None:
    with pytest.raises(Exception, match="(?i)check"):
        await add_project(repository, max_concurrent=0)
    project = await add_project(repository, "beta")
    with pytest.raises(Exception, match="(?i)check"):
        await add_token(repository, project, max_concurrent=0)


async def test_repository_update_unknown_project_returns_none(
    repository: Repository,
) -> None:
    changes = ProjectChanges(name="x")
    assert await repository.update_project(str(uuid.uuid4()), changes, now=NOW) is None
    assert await repository.update_project("not-a-uuid", changes, now=NOW) is None


async def test_repository_update_project_to_taken_name_raises(
    repository: Repository,
) -> None:
    await add_project(repository, "alpha")
    beta = await add_project(repository, "beta")
    with pytest.raises(DuplicateNameError):
        await repository.update_project(beta.id, ProjectChanges(name="alpha"), now=NOW)


async def test_repository_delete_project_cascades_to_tokens(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    other = await add_project(repository, "other")
    token = await add_token(repository, project)
    kept = await add_token(repository, other)
    assert await repository.delete_project(project.id) is True
    assert await repository.get_project(project.id) is None
    assert await repository.get_token(token.id) is None
    assert await repository.get_token(kept.id) == kept
    assert await repository.delete_project(project.id) is False
    assert await repository.delete_project("not-a-uuid") is False


# -- tokens ---------------------------------------------------------------------------


async def test_repository_token_round_trips_by_id_and_hash(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(
        repository,
        project,
        request_count=3,
        max_requests=100,
        rate_limit_per_hour=60,
        last_used_at=NOW,
    )
    assert await repository.get_token(token.id) == token
    assert await repository.get_token_by_hash(token.token_hash) == token
    assert await repository.get_token(str(uuid.uuid4())) is None
    assert await repository.get_token("not-a-uuid") is None
    assert await repository.get_token_by_hash("0" * 64) is None


async def test_repository_token_for_unknown_project_raises(
    repository: Repository,
) -> None:
    with pytest.raises(RepositoryError, match="unknown project"):
        await add_token(repository, make_project())


async def test_repository_token_filters_separate_live_expired_and_revoked(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    other = await add_project(repository, "other")
    live = await add_token(repository, project, created_at=NOW - 3 * HOUR)
    expired = await add_token(
        repository, project, created_at=NOW - 2 * HOUR, expires_at=NOW
    )
    revoked = await add_token(
        repository, project, created_at=NOW - HOUR, is_active=False
    )
    foreign = await add_token(repository, other, created_at=NOW)

    async def listed(token_filter: TokenFilter) -> list[Token]:
        return await repository.list_tokens(token_filter, now=NOW, limit=10, offset=0)

    assert await listed(TokenFilter()) == [foreign, revoked, expired, live]
    assert await listed(TokenFilter(active=True)) == [foreign, live]
    assert await listed(TokenFilter(active=False)) == [revoked, expired]
    mine = TokenFilter(project_id=project.id)
    assert await listed(mine) == [revoked, expired, live]
    assert await listed(replace(mine, active=True)) == [live]
    assert await listed(replace(mine, active=False)) == [revoked, expired]
    assert await listed(TokenFilter(project_id="not-a-uuid")) == []
    assert await repository.count_tokens(TokenFilter(), now=NOW) == 4
    assert await repository.count_tokens(replace(mine, active=False), now=NOW) == 2
    assert await repository.count_tokens(TokenFilter(project_id="bad"), now=NOW) == 0
    page = await repository.load_tokens_changed_since(0, limit=10, active_only=True)
    assert page.rows == [live, expired, foreign]  # the auth table keeps expired ones


async def test_repository_list_tokens_pages_newest_first(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    tokens = [
        await add_token(repository, project, created_at=NOW + i * HOUR)
        for i in range(5)
    ]
    page = await repository.list_tokens(TokenFilter(), now=NOW, limit=2, offset=1)
    assert page == [tokens[3], tokens[2]]


async def test_repository_revoke_token_is_idempotent(repository: Repository) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project)
    assert await repository.revoke_token(token.id) is True
    assert await repository.revoke_token(token.id) is True
    assert await repository.get_token(token.id) == replace(token, is_active=False)
    assert await repository.revoke_token(str(uuid.uuid4())) is False
    assert await repository.revoke_token("not-a-uuid") is False


async def test_repository_revoke_project_tokens_counts(repository: Repository) -> None:
    project = await add_project(repository)
    other = await add_project(repository, "other")
    for _ in range(3):
        await add_token(repository, project)
    await add_token(repository, project, is_active=False)
    untouched = await add_token(repository, other)
    first = await repository.revoke_project_tokens(project.id)
    assert first == RevokeCounts(
        revoked_count=3, already_revoked_count=1, total_tokens=4
    )
    again = await repository.revoke_project_tokens(project.id)
    assert again == RevokeCounts(
        revoked_count=0, already_revoked_count=4, total_tokens=4
    )
    assert await repository.get_token(untouched.id) == untouched
    empty = RevokeCounts(revoked_count=0, already_revoked_count=0, total_tokens=0)
    assert await repository.revoke_project_tokens(str(uuid.uuid4())) == empty
    assert await repository.revoke_project_tokens("not-a-uuid") == empty


async def test_repository_record_usage_adds_counts_and_keeps_latest_use(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project, request_count=1)
    unused = await add_token(repository, project)
    await repository.record_token_usage(
        [
            TokenUsage(token.id, 2, NOW),
            TokenUsage(token.id, 3, NOW - HOUR),  # older: last_used_at stays
            TokenUsage(str(uuid.uuid4()), 5, NOW),  # unknown tokens are ignored
            TokenUsage("not-a-uuid", 5, NOW),
        ]
    )
    await repository.record_token_usage([])
    stored = await repository.get_token(token.id)
    assert stored == replace(token, request_count=6, last_used_at=NOW)
    await repository.record_token_usage([TokenUsage(token.id, 1, NOW + HOUR)])
    stored = await repository.get_token(token.id)
    assert stored is not None and stored.last_used_at == NOW + HOUR
    assert await repository.get_token(unused.id) == unused


async def test_repository_concurrent_usage_writes_are_all_counted(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project)
    batches = [[TokenUsage(token.id, 1, NOW + i * HOUR)] for i in range(20)]
    await asyncio.gather(
        *(repository.record_token_usage(batch) for batch in batches),
        repository.revoke_project_tokens(project.id),
    )
    stored = await repository.get_token(token.id)
    assert stored is not None
    assert (stored.request_count, stored.last_used_at) == (20, NOW + 19 * HOUR)
    assert stored.is_active is False


# -- SQLite specifics -----------------------------------------------------------------


async def test_sqlite_repository_creates_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "proxy.db"
    repository = SqliteRepository(path)
    await repository.connect()
    try:
        await repository.migrate()
        assert path.is_file()
        assert (tmp_path / "nested" / "dir" / "proxy.db-wal").exists()
    finally:
        await repository.close()


async def test_sqlite_repository_rejects_naive_datetimes(
    tmp_path: Path,
) -> None:
    repository = SqliteRepository(tmp_path / "proxy.db")
    await repository.connect()
    try:
        await repository.migrate()
        with pytest.raises(ValueError, match="timezone-aware"):
            await repository.purge_deletions(before=NOW.replace(tzinfo=None))
    finally:
        await repository.close()


async def test_sqlite_migration_splits_triggers_and_quoted_semicolons(
    tmp_path: Path,
) -> None:
    (tmp_path / "sql" / "sqlite").mkdir(parents=True)
    (tmp_path / "sql" / "sqlite" / "001_triggers.sql").write_text(
        "CREATE TABLE t (x TEXT); -- comment; with semicolon\n"
        "CREATE TRIGGER t_copy AFTER INSERT ON t BEGIN\n"
        "  INSERT INTO t2 VALUES (new.x || ';');\n"
        "END;\n"
        "CREATE TABLE t2 (x TEXT); INSERT INTO t VALUES ('a;b')\n"
        "-- trailing comment"
    )
    repository = SqliteRepository(tmp_path / "proxy.db", sql_dir=tmp_path / "sql")
    await repository.connect()
    try:
        assert await repository.migrate() == [1]
    finally:
        await repository.close()


async def test_sqlite_times_are_fixed_width_utc_text(tmp_path: Path) -> None:
    repository = SqliteRepository(tmp_path / "proxy.db")
    await repository.connect()
    try:
        await repository.migrate()
        plus_two = NOW.astimezone(timezone(timedelta(hours=2)))
        project = await add_project(repository, created_at=plus_two)
        stored = await repository.get_project(project.id)
        assert stored is not None and stored.created_at == NOW
        assert stored.created_at.utcoffset() == timedelta(0)
    finally:
        await repository.close()


# -- PostgreSQL specifics -------------------------------------------------------------


class _HoldingRepository(PostgresRepository):
    """Keeps one pooled connection checked out, like a request stuck mid-query."""

    async def hold(self) -> Any:
        return await self._connected.acquire()


@pytest.mark.postgres
async def test_postgres_close_terminates_pool_after_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = await _postgres_admin()
    await admin.close()
    repository = _HoldingRepository(_postgres_url(), close_timeout_s=0.05)
    await repository.connect()
    connection = await repository.hold()
    async with asyncio.timeout(5):  # without terminate() this would wait forever
        await repository.close()
    assert "terminating" in caplog.text
    with pytest.raises(asyncpg.InterfaceError):
        await connection.fetchval("SELECT 1")


def test_postgres_repository_repr_hides_dsn() -> None:
    repository = PostgresRepository("postgresql://user:s3cret@db/x", schema="s")
    assert "s3cret" not in repr(repository)


# -- create_repository, migrations files, resources --------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("sqlite:///relative/proxy.db", SqliteRepository),
        ("sqlite:////absolute/proxy.db", SqliteRepository),
        ("postgres://user@host/db", PostgresRepository),
        ("PostgreSQL://user@host/db", PostgresRepository),
    ],
)
def test_create_repository_chooses_backend_by_scheme(url: str, kind: type) -> None:
    assert isinstance(create_repository(url), kind)


async def test_create_repository_resolves_sqlite_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = create_repository("sqlite:///rel/proxy.db")
    absolute = create_repository(f"sqlite:///{tmp_path / 'abs' / 'proxy.db'}")
    for repository in (relative, absolute):
        await repository.connect()
        await repository.close()
    assert (tmp_path / "rel" / "proxy.db").is_file()
    assert (tmp_path / "abs" / "proxy.db").is_file()


@pytest.mark.parametrize(
    "url",
    ["mysql://root:s3cret@host/db", "sqlite://host/proxy.db", "sqlite:///", "proxy.db"],
)
def test_create_repository_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL") as caught:
        create_repository(url)
    assert "s3cret" not in str(caught.value)


def test_migrations_ship_for_both_dialects() -> None:
    for dialect in ("sqlite", "postgres"):
        versions = [m.version for m in load_migrations(SQL_DIR, dialect)]
        assert versions[0] == 1
        assert versions == sorted(set(versions))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["001_init.sql", "001_again.sql"], "share version"),
        (["1_init.sql"], "001_name.sql"),
        (["000_zero.sql"], "start at 001"),
    ],
)
def test_migrations_reject_bad_files(
    tmp_path: Path, names: list[str], message: str
) -> None:
    (tmp_path / "sqlite").mkdir()
    for name in names:
        (tmp_path / "sqlite" / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=message):
        load_migrations(tmp_path, "sqlite")


def test_migrations_require_dialect_directory(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no migrations directory"):
        load_migrations(tmp_path, "sqlite")


def test_sql_dir_is_package_data() -> None:
    package_dir = Path(llm_proxy.storage.__file__).resolve().parent
    assert package_dir / "sql" == SQL_DIR
    assert (SQL_DIR / "sqlite" / "001_init.sql").is_file()


# -- SQL hygiene ----------------------------------------------------------------------

DB_CALLS = {
    "execute",
    "executemany",
    "execute_fetchall",
    "fetch",
    "fetchrow",
    "fetchval",
    "_run",
    "_write",
    "_fetch_all",
    "_fetch_one",
    "_scalar",
}
LOCAL_SQL_NAMES = {"sql", "pragma", "statement"}  # parameters and loop variables


@pytest.mark.parametrize("module", [sqlite, postgres], ids=["sqlite", "postgres"])
def test_backend_sql_values_are_always_bound_parameters(module: Any) -> None:
    """Every database call takes a module-level SQL constant, never a built string."""
    tree = ast.parse(Path(module.__file__).read_text())
    constants = {
        target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.isupper()
    }
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in DB_CALLS
    ]
    assert calls
    for call in calls:
        sql = call.args[0]
        allowed = (
            isinstance(sql, ast.Name) and sql.id in constants | LOCAL_SQL_NAMES
        ) or (isinstance(sql, ast.Attribute) and sql.attr == "sql")
        assert allowed, f"line {call.lineno}: SQL must be a constant"
    for node in tree.body:  # f-strings in constants may only splice other constants
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            for part in ast.walk(node.value):
                if isinstance(part, ast.FormattedValue):
                    assert isinstance(part.value, ast.Name)
                    assert part.value.id in constants


# -- usage events ---------------------------------------------------------------------


def make_event(
    project: Project | None = None,
    token: Token | None = None,
    *,
    ts: datetime = NOW,
    status_code: int = 200,
    **fields: Any,
) -> UsageEvent:
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "ts": ts,
        "project_id": None if project is None else project.id,
        "token_id": None if token is None else token.id,
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status_code": status_code,
        "duration_ms": 12.5,
        "model": "gpt-4o-mini",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "usage_source": "response",
    }
    return UsageEvent(**(values | fields))


async def test_repository_usage_insert_is_idempotent_on_event_id(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    first, second = make_event(project), make_event(project)
    assert await repository.insert_usage_events([first, second]) == 2
    assert await repository.insert_usage_events([first, make_event(project)]) == 1
    assert await repository.insert_usage_events([]) == 0
    totals = await repository.usage_totals(since=NOW - HOUR, until=NOW + HOUR)
    assert totals.requests == 3


async def test_repository_usage_insert_of_a_large_batch_spans_statements(
    repository: Repository,
) -> None:
    """More rows than one statement carries: all in, once, even when resent."""
    project = await add_project(repository)
    batch = [make_event(project) for _ in range(2_345)]
    assert await repository.insert_usage_events(batch) == len(batch)
    assert await repository.insert_usage_events(batch[1_000:1_100]) == 0
    totals = await repository.usage_totals(since=NOW - HOUR, until=NOW + HOUR)
    assert totals.requests == len(batch)


async def test_repository_usage_text_is_stored_without_nul_and_bounded(
    repository: Repository,
) -> None:
    """PostgreSQL refuses NUL in text: both backends store U+FFFD instead."""
    nul = make_event(model="gpt\x00-4o", endpoint="/v1/\x00x", method="PO\x00ST")
    long = make_event(model="m" * 5_000, usage_source="u\x00")
    surrogate = make_event(model="caf\udce9")
    assert await repository.insert_usage_events([nul, long, surrogate]) == 3
    rows = {row.event_id: row for row in await repository.recent_usage_events(10)}
    stored = rows[nul.event_id]
    assert (stored.model, stored.endpoint, stored.method) == (
        "gpt\ufffd-4o",
        "/v1/\ufffdx",
        "PO\ufffdST",
    )
    assert rows[long.event_id].model == "m" * MAX_TEXT_CHARS
    assert rows[long.event_id].usage_source == "u\ufffd"
    assert rows[surrogate.event_id].model == "caf?"
    assert nul.model == "gpt\x00-4o"  # the caller's row is left as it was


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_tokens": 2**31},
        {"total_tokens": 2**63},
        {"status_code": -(2**31) - 1},
        {"completion_tokens": 1.5},
        {"model": 12},
        {"project_id": {"id": 1}},
        {"event_id": ""},
        {"event_id": "e" * 201},
        {"duration_ms": "fast"},
        {"endpoint": None},  # refused by the database itself: NOT NULL
    ],
    ids=repr,
)
async def test_repository_usage_insert_refuses_unstorable_rows_whole(
    repository: Repository, fields: dict[str, Any]
) -> None:
    batch = [make_event(), make_event(**fields), make_event()]
    with pytest.raises(RejectedRowsError):
        await repository.insert_usage_events(batch)
    totals = await repository.usage_totals(since=NOW - HOUR, until=NOW + HOUR)
    assert totals.requests == 0
    assert await repository.insert_usage_events([batch[0], batch[2]]) == 2


async def test_repository_refused_row_in_a_large_batch_rolls_back_every_statement(
    repository: Repository,
) -> None:
    batch = [make_event() for _ in range(2_345)] + [make_event(endpoint=None)]
    with pytest.raises(RejectedRowsError):
        await repository.insert_usage_events(batch)
    totals = await repository.usage_totals(since=NOW - HOUR, until=NOW + HOUR)
    assert totals.requests == 0


async def test_repository_usage_totals_count_errors_and_tokens_in_window(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project)
    other = await add_project(repository, "beta")
    await repository.insert_usage_events(
        [
            make_event(project, token),
            make_event(project, token, status_code=429, total_tokens=None),
            make_event(project, None, status_code=500, prompt_tokens=None),
            make_event(other),
            make_event(project, token, ts=NOW - 2 * HOUR),  # before the window
            make_event(project, token, ts=NOW + HOUR),  # until is exclusive
        ]
    )
    window = {"since": NOW - HOUR, "until": NOW + HOUR}
    assert await repository.usage_totals(**window) == UsageTotals(4, 2, 30, 20, 45)
    assert await repository.usage_totals(**window, project_id=project.id) == (
        UsageTotals(3, 2, 20, 15, 30)
    )
    assert await repository.usage_totals(**window, token_id=token.id) == (
        UsageTotals(2, 1, 20, 10, 15)
    )
    unknown = await repository.usage_totals(**window, project_id="not-a-uuid")
    assert unknown == UsageTotals()


async def test_repository_usage_by_day_groups_by_utc_date(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    local = timezone(timedelta(hours=5))
    late = datetime(2025, 1, 31, 2, 0, tzinfo=local)  # 21:00 UTC on Jan 30
    await repository.insert_usage_events(
        [
            make_event(project, ts=NOW - timedelta(days=1)),
            make_event(project, ts=late),
            make_event(project, ts=NOW, status_code=502),
        ]
    )
    rows = await repository.usage_by_day(
        since=NOW - timedelta(days=7), until=NOW + HOUR, project_id=project.id
    )
    assert rows == [
        UsageRow("2025-01-30", UsageTotals(2, 0, 20, 10, 30)),
        UsageRow("2025-01-31", UsageTotals(1, 1, 10, 5, 15)),
    ]
    assert (
        await repository.usage_by_day(
            since=NOW - HOUR, until=NOW + HOUR, token_id="not-a-uuid"
        )
        == []
    )


async def test_repository_usage_by_project_and_token_rank_busiest_first(
    repository: Repository,
) -> None:
    alpha, beta = await add_project(repository), await add_project(repository, "beta")
    quiet, busy = await add_token(repository, alpha), await add_token(repository, alpha)
    beta_token = await add_token(repository, beta)
    await repository.insert_usage_events(
        [
            make_event(alpha, quiet),
            make_event(alpha, busy),
            make_event(alpha, busy, status_code=401),
            make_event(beta, beta_token),
            make_event(None, None, status_code=401),  # no project: not grouped
        ]
    )
    window = {"since": NOW - HOUR, "until": NOW + HOUR}
    by_project = await repository.usage_by_project(**window)
    assert [(row.key, row.totals.requests) for row in by_project] == [
        (alpha.id, 3),
        (beta.id, 1),
    ]
    assert len(await repository.usage_by_project(**window, limit=1)) == 1
    by_token = await repository.usage_by_token(**window, project_id=alpha.id)
    assert [(row.key, row.totals.errors) for row in by_token] == [
        (busy.id, 1),
        (quiet.id, 0),
    ]
    assert len(await repository.usage_by_token(**window)) == 3
    assert await repository.usage_by_token(**window, project_id="nope") == []


async def test_repository_recent_usage_events_newest_first_and_errors_only(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project)
    old = make_event(project, token, ts=NOW - HOUR)
    new = make_event(project, token, ts=NOW, status_code=503, model=None)
    anonymous = make_event(ts=NOW - 2 * HOUR, status_code=401, duration_ms=0.5)
    await repository.insert_usage_events([old, new, anonymous])
    assert await repository.recent_usage_events(10) == [new, old, anonymous]
    assert await repository.recent_usage_events(2) == [new, old]
    errors = await repository.recent_usage_events(10, errors_only=True)
    assert errors == [new, anonymous]


def test_usage_rows_per_insert_stay_within_this_sqlite_s_variable_limit() -> None:
    import contextlib
    import sqlite3

    from llm_proxy.storage.sqlite import USAGE_ROW, USAGE_ROWS_PER_INSERT

    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        limit = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    assert 1 <= USAGE_ROWS_PER_INSERT * USAGE_ROW.count("?") <= limit


def test_sqlite_time_text_is_the_same_for_utc_and_other_offsets() -> None:
    from llm_proxy.storage.sqlite import _to_text

    moment = datetime(2026, 11, 27, 10, 49, 19, 123000, tzinfo=UTC)
    elsewhere = moment.astimezone(timezone(timedelta(hours=2)))
    assert _to_text(moment) == _to_text(elsewhere) == "2026-11-27T10:49:19.123000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        _to_text(moment.replace(tzinfo=None))


# -- change tracking for the token table ----------------------------------------------


async def _all_changed_tokens(repository: Repository, mark: int) -> list[Token]:
    rows: list[Token] = []
    page = await repository.load_tokens_changed_since(mark, limit=2)
    rows += page.rows
    while page.cursor is not None:
        page = await repository.load_tokens_changed_since(
            mark, after=page.cursor, limit=2
        )
        rows += page.rows
    return rows


async def test_repository_changes_since_a_mark_cover_every_kind_of_write(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    first, second = (
        await add_token(repository, project),
        await add_token(repository, project),
    )
    mark = await repository.change_mark()
    assert await _all_changed_tokens(repository, mark) == []
    assert (await repository.load_projects_changed_since(mark, limit=10)).rows == []

    await repository.revoke_token(first.id)
    usage = TokenUsage(second.id, 3, NOW)
    await repository.record_token_usage([usage])
    changed = {token.id: token for token in await _all_changed_tokens(repository, mark)}
    assert changed.keys() == {first.id, second.id}
    assert not changed[first.id].is_active  # a revoked token is reported, not hidden
    assert changed[second.id].request_count == 3

    later = await repository.change_mark()
    assert later > mark
    await repository.update_project(
        project.id, ProjectChanges(is_active=False), now=NOW
    )
    [updated] = (await repository.load_projects_changed_since(later, limit=10)).rows
    assert updated.id == project.id and not updated.is_active
    await repository.revoke_project_tokens(project.id)  # revokes only `second`
    assert {t.id for t in await _all_changed_tokens(repository, later)} == {second.id}


async def test_repository_changed_tokens_page_by_marker_without_gaps(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    tokens = [await add_token(repository, project) for _ in range(5)]
    pages = []
    page = await repository.load_tokens_changed_since(0, limit=2)
    pages.append(page.rows)
    while page.cursor is not None:
        page = await repository.load_tokens_changed_since(0, after=page.cursor, limit=2)
        pages.append(page.rows)
    assert [len(rows) for rows in pages] == [2, 2, 1]
    assert [token for rows in pages for token in rows] == tokens  # write order


async def test_repository_deletions_leave_tombstones_also_by_cascade(
    repository: Repository,
) -> None:
    project = await add_project(repository)
    kept = await add_project(repository, "kept")
    tokens = [await add_token(repository, project) for _ in range(3)]
    await add_token(repository, kept)
    mark = await repository.change_mark()
    assert (await repository.load_deletions_since(mark, limit=10)).rows == []
    assert await repository.delete_project(project.id)
    page = await repository.load_deletions_since(mark, limit=2)
    rest = await repository.load_deletions_since(mark, after=page.cursor, limit=10)
    deleted = {(d.kind, d.id) for d in page.rows + rest.rows}
    assert deleted == {("project", project.id)} | {("token", t.id) for t in tokens}
    assert rest.cursor is None
    later = await repository.change_mark()
    assert (await repository.load_deletions_since(later, limit=10)).rows == []
    assert await repository.purge_deletions(before=NOW) == 0  # all newer than NOW
    assert await repository.purge_deletions(before=datetime.now(UTC) + HOUR) == 4
    assert (await repository.load_deletions_since(mark, limit=10)).rows == []


@pytest.mark.postgres
async def test_postgres_change_committed_late_by_an_older_transaction_is_not_missed() -> (
    None
):
    """A writer that started first but commits after a reader's pass is found next."""
    async with _postgres_schema() as schema:
        repository = PostgresRepository(_postgres_url(), schema=schema)
        await repository.connect()
        slow = await asyncpg.connect(
            _postgres_url(), server_settings={"search_path": schema}
        )
        try:
            await repository.migrate()
            project = await add_project(repository)
            early, late = (
                await add_token(repository, project),
                await add_token(repository, project),
            )
            start = await repository.change_mark()
            writer = slow.transaction()
            await writer.start()
            await slow.execute(
                "UPDATE tokens SET max_requests = 7 WHERE id = $1", uuid.UUID(early.id)
            )
            await repository.record_token_usage([TokenUsage(late.id, 1, NOW)])
            mark = await repository.change_mark()  # taken while `slow` still runs
            seen = await _all_changed_tokens(repository, start)
            assert [t.id for t in seen] == [late.id]
            await writer.commit()  # commits after the reader's pass, older xid
            again = await _all_changed_tokens(repository, mark)
            assert early.id in {t.id for t in again}
            assert next(t for t in again if t.id == early.id).max_requests == 7
        finally:
            await slow.close()
            await repository.close()
