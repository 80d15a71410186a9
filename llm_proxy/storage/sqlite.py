"""SQLite storage: one aiosqlite connection in WAL mode and every SQLite SQL string.

Times are stored as ISO-8601 UTC text in one fixed-width format
(`2025-01-31T12:00:00.000000Z`), so text comparison and ORDER BY are chronological.
Booleans are 0/1 integers. One `asyncio.Lock` serialises writes: a single connection
means a single writer, and multi-statement transactions must not interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiosqlite

from ..private_files import create_private_file
from ._common import (
    check_page,
    dump_metadata,
    like_pattern,
    load_metadata,
    storable_usage_event,
)
from .audit_sql import AuditMethods, audit_statements
from .base import (
    ChangeCursor,
    ChangePage,
    Deletion,
    DuplicateNameError,
    MigrationError,
    Project,
    ProjectChanges,
    PurgeCounts,
    RejectedRowsError,
    RepositoryError,
    RevokeCounts,
    Token,
    TokenFilter,
    TokenUsage,
    UsageEvent,
    UsageRow,
    UsageTotals,
)
from .migrations import SQL_DIR, Migration, load_migrations

log = logging.getLogger(__name__)

DIALECT: Final = "sqlite"

PRAGMAS: Final = (
    "PRAGMA busy_timeout = 5000",  # first: switching to WAL may wait for other writers
    "PRAGMA journal_mode = WAL",
    # Safe with WAL: a power cut can lose the last commits, never corrupt the file.
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
)
PRAGMA_ATTEMPTS: Final = 100
BEGIN: Final = "BEGIN IMMEDIATE"  # take the write lock now, not at the first write
COMMIT: Final = "COMMIT"
ROLLBACK: Final = "ROLLBACK"

CREATE_SCHEMA_VERSION: Final = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""
HAS_SCHEMA_VERSION: Final = (
    "SELECT count(*) FROM sqlite_master"
    " WHERE type = 'table' AND name = 'schema_version'"
)
SELECT_SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM schema_version"
IS_APPLIED: Final = "SELECT count(*) FROM schema_version WHERE version = ?"
INSERT_SCHEMA_VERSION: Final = (
    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)"
)

PING: Final = "SELECT 1"
SELECT_META: Final = "SELECT value FROM meta WHERE key = ?"
UPSERT_META: Final = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

PROJECT_COLUMNS: Final = (
    "id, name, description, metadata, openai_api_key, api_key_hint, is_active,"
    " created_at, updated_at, max_concurrent"
)
INSERT_PROJECT: Final = (
    f"INSERT INTO projects ({PROJECT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_PROJECT: Final = f"SELECT {PROJECT_COLUMNS} FROM projects WHERE id = ?"
SEARCH_PROJECTS: Final = "(?1 IS NULL OR name LIKE ?1 ESCAPE '\\')"
LIST_PROJECTS: Final = (
    f"SELECT {PROJECT_COLUMNS} FROM projects WHERE {SEARCH_PROJECTS}"
    " ORDER BY created_at, id LIMIT ?2 OFFSET ?3"
)
COUNT_PROJECTS: Final = f"SELECT count(*) FROM projects WHERE {SEARCH_PROJECTS}"
UPDATE_PROJECT: Final = f"""
UPDATE projects SET
    name = coalesce(?, name),
    description = coalesce(?, description),
    metadata = coalesce(?, metadata),
    openai_api_key = coalesce(?, openai_api_key),
    api_key_hint = coalesce(?, api_key_hint),
    is_active = coalesce(?, is_active),
    max_concurrent = CASE WHEN ? THEN NULL ELSE coalesce(?, max_concurrent) END,
    updated_at = ?
WHERE id = ?
RETURNING {PROJECT_COLUMNS}"""
DELETE_PROJECT: Final = "DELETE FROM projects WHERE id = ?"

TOKEN_COLUMNS: Final = (
    "id, token, token_hint, project_id, expires_at, is_active, request_count,"
    " max_requests, rate_limit_per_hour, created_at, last_used_at, max_concurrent"
)
INSERT_TOKEN: Final = (
    f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_TOKEN: Final = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?"
SELECT_TOKEN_BY_HASH: Final = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token = ?"
# ?1 project id or NULL; ?2 wanted liveness (1/0) or NULL; ?3 now.
FILTER_TOKENS: Final = (
    "(?1 IS NULL OR project_id = ?1)"
    " AND (?2 IS NULL OR ?2 = (is_active = 1 AND expires_at > ?3))"
)
LIST_TOKENS: Final = (
    f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE {FILTER_TOKENS}"
    " ORDER BY created_at DESC, id LIMIT ?4 OFFSET ?5"
)
COUNT_TOKENS: Final = f"SELECT count(*) FROM tokens WHERE {FILTER_TOKENS}"
REVOKE_TOKEN: Final = "UPDATE tokens SET is_active = 0 WHERE id = ?"
COUNT_PROJECT_TOKENS: Final = (
    "SELECT count(*), coalesce(sum(is_active = 0), 0) FROM tokens WHERE project_id = ?"
)
REVOKE_PROJECT_TOKENS: Final = (
    "UPDATE tokens SET is_active = 0 WHERE project_id = ? AND is_active = 1"
)
RECORD_TOKEN_USAGE: Final = (
    "UPDATE tokens SET request_count = request_count + ?1,"
    " last_used_at = max(coalesce(last_used_at, ?2), ?2) WHERE id = ?3"
)
# Change markers (migration 004): rows and tombstones carry the counter value of the
# write; every later commit gets a larger one, so the next value is the mark. Pages
# are read by keyset on (change_seq, id): ?1 ?2 the cursor, ?3 the page size.
CHANGE_MARK: Final = "SELECT seq + 1 FROM change_counter WHERE id = 1"
START_ID: Final = ""  # sorts before every id, so (mark, START_ID) starts at `mark`
CHANGE_SEQ: Final = 12  # the position of change_seq in a TOKENS_CHANGED row
TOKENS_CHANGED: Final = (
    f"SELECT {TOKEN_COLUMNS}, change_seq FROM tokens"
    " WHERE (change_seq, id) > (?1, ?2) AND (?4 = 0 OR is_active = 1)"
    " ORDER BY change_seq, id LIMIT ?3"
)
PROJECTS_CHANGED: Final = (
    f"SELECT {PROJECT_COLUMNS}, change_seq FROM projects"
    " WHERE (change_seq, id) > (?1, ?2) ORDER BY change_seq, id LIMIT ?3"
)
DELETIONS_SINCE: Final = (
    "SELECT kind, id, change_seq FROM deletions"
    " WHERE (change_seq, id) > (?1, ?2) ORDER BY change_seq, id LIMIT ?3"
)
PURGE_DELETIONS: Final = "DELETE FROM deletions WHERE deleted_at < ?"
# Retention (migration 005 dates revocations): ?1 the cut-off, ?2 the batch size. Each
# batch is one DELETE, its own short write transaction; rows go by rowid.
PURGEABLE_TOKENS: Final = "expires_at < ?1 OR (is_active = 0 AND revoked_at < ?1)"
COUNT_PURGEABLE_TOKENS: Final = f"SELECT count(*) FROM tokens WHERE {PURGEABLE_TOKENS}"
PURGE_TOKENS: Final = (
    "DELETE FROM tokens WHERE rowid IN"
    f" (SELECT rowid FROM tokens WHERE {PURGEABLE_TOKENS} LIMIT ?2)"
)
COUNT_OLD_USAGE_EVENTS: Final = "SELECT count(*) FROM usage_events WHERE ts < ?1"
PURGE_USAGE_EVENTS: Final = (
    "DELETE FROM usage_events WHERE rowid IN"
    " (SELECT rowid FROM usage_events WHERE ts < ?1 ORDER BY ts LIMIT ?2)"
)
# The purge lock is a lease in `meta`, "<expiry>|<holder>", taken when absent or
# expired: SQLite has no lock that ends with a connection, and a lease also ends when
# its holder dies. The expiry is the value's first 27 characters (fixed-width time).
PURGE_LOCK_KEY: Final = "purge_lock"
TAKE_PURGE_LOCK: Final = (
    "INSERT INTO meta (key, value) VALUES (?1, ?2)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    " WHERE substr(meta.value, 1, 27) < ?3"
)
RELEASE_PURGE_LOCK: Final = "DELETE FROM meta WHERE key = ?1 AND value = ?2"

USAGE_COLUMNS: Final = (
    "event_id, ts, project_id, token_id, endpoint, method, model, status_code,"
    " duration_ms, prompt_tokens, completion_tokens, total_tokens, usage_source"
)
USAGE_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Errors that blame the rows, not the database file: constraints, values the
# sqlite3 module cannot bind (too large, wrong type, undecodable text).
USAGE_DATA_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    ValueError,
    TypeError,
    OverflowError,
)


# One multi-row INSERT per chunk instead of executemany: the sqlite3 module releases
# and re-takes the GIL around every row, and under a busy event loop each re-take
# waits. SQLite 3.32+ binds up to 32,766 parameters per statement by default (older
# builds 999; distributions may change it), so the limit of the library in use decides:
# usually a whole dispatcher batch is one statement and one trip to the worker thread.
def _max_usage_rows_per_insert() -> int:
    with contextlib.closing(sqlite3.connect(":memory:")) as probe:
        variables = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(1000, variables // USAGE_ROW.count("?")))


USAGE_ROWS_PER_INSERT: Final = _max_usage_rows_per_insert()


@functools.lru_cache(maxsize=16)
def insert_usage_events_sql(rows: int) -> str:
    """The INSERT of `rows` usage events that skips event ids already stored."""
    return (
        f"INSERT INTO usage_events ({USAGE_COLUMNS}) VALUES "
        + ", ".join([USAGE_ROW] * rows)
        + " ON CONFLICT (event_id) DO NOTHING"
    )


# ?1 since, ?2 until, ?3 project id or NULL, ?4 token id or NULL.
USAGE_WHERE: Final = (
    "ts >= ?1 AND ts < ?2 AND (?3 IS NULL OR project_id = ?3)"
    " AND (?4 IS NULL OR token_id = ?4)"
)
USAGE_SUMS: Final = (
    "count(*), coalesce(sum(status_code >= 400), 0), coalesce(sum(prompt_tokens), 0),"
    " coalesce(sum(completion_tokens), 0), coalesce(sum(total_tokens), 0)"
)
USAGE_TOTALS: Final = f"SELECT {USAGE_SUMS} FROM usage_events WHERE {USAGE_WHERE}"
USAGE_BY_DAY: Final = (
    f"SELECT substr(ts, 1, 10) AS day, {USAGE_SUMS} FROM usage_events"
    f" WHERE {USAGE_WHERE} GROUP BY day ORDER BY day"
)
USAGE_BY_PROJECT: Final = (
    f"SELECT project_id, {USAGE_SUMS} FROM usage_events"
    f" WHERE {USAGE_WHERE} AND project_id IS NOT NULL"
    " GROUP BY project_id ORDER BY count(*) DESC, project_id LIMIT ?5"
)
USAGE_BY_TOKEN: Final = (
    f"SELECT token_id, {USAGE_SUMS} FROM usage_events"
    f" WHERE {USAGE_WHERE} AND token_id IS NOT NULL"
    " GROUP BY token_id ORDER BY count(*) DESC, token_id LIMIT ?5"
)
RECENT_USAGE_EVENTS: Final = (
    f"SELECT {USAGE_COLUMNS} FROM usage_events WHERE (?1 = 0 OR status_code >= 400)"
    " ORDER BY ts DESC, event_id LIMIT ?2"
)

Params = Sequence[Any]


class SqliteRepository(AuditMethods):
    """`Repository` on one aiosqlite connection to a database file."""

    _audit_sql = audit_statements("sqlite")
    _audit_data_errors = USAGE_DATA_ERRORS

    def __init__(self, path: Path | str, *, sql_dir: Path | None = None) -> None:
        self._path = Path(path)
        self._sql_dir = sql_dir
        self._conn: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Create the file (0600, new folders 0700), connect and set the pragmas."""
        if self._conn is not None:
            return
        # SQLite gives the -wal and -shm files the database file's mode.
        await asyncio.to_thread(create_private_file, self._path)
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        self._conn = conn
        for pragma in PRAGMAS:
            await self._run_pragma(pragma)

    async def _run_pragma(self, pragma: str) -> None:
        """Run a pragma; retry `database is locked` a few times.

        Switching to WAL needs a moment of exclusive access and SQLite answers BUSY
        at once (its busy handler is not used for it) while another connection, e.g.
        a second process starting at the same time, is doing the same.
        """
        for attempt in range(PRAGMA_ATTEMPTS):
            try:
                await self._run(pragma)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == PRAGMA_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def migrate(self) -> list[int]:
        """Apply each pending migration in its own transaction."""
        migrations = load_migrations(self._sql_dir or SQL_DIR, DIALECT)
        await self._write(CREATE_SCHEMA_VERSION)
        return [m.version for m in migrations if await self._apply_if_pending(m)]

    async def schema_version(self) -> int:
        """Highest applied migration version (0 when none)."""
        if not await self._scalar(HAS_SCHEMA_VERSION):
            return 0
        return int(await self._scalar(SELECT_SCHEMA_VERSION))

    async def ping(self) -> None:
        """Raise if the database does not answer."""
        await self._scalar(PING)

    async def get_meta(self, key: str) -> str | None:
        """Read a server-wide value."""
        row = await self._fetch_one(SELECT_META, (key,))
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Write a server-wide value, replacing any previous one."""
        await self._write(UPSERT_META, (key, value))

    async def create_project(self, project: Project) -> None:
        """Insert a project; `DuplicateNameError` when the name is taken."""
        try:
            await self._write(INSERT_PROJECT, _project_params(project))
        except sqlite3.IntegrityError as exc:
            _raise_if_duplicate_name(exc, project.name)
            raise

    async def get_project(self, project_id: str) -> Project | None:
        """One project by id."""
        row = await self._fetch_one(SELECT_PROJECT, (project_id,))
        return None if row is None else _project(row)

    async def list_projects(
        self, *, limit: int, offset: int, search: str | None = None
    ) -> list[Project]:
        """Projects ordered by created_at then id; `search` matches name substrings."""
        check_page(limit, offset)
        params = (like_pattern(search), limit, offset)
        rows = await self._fetch_all(LIST_PROJECTS, params)
        return [_project(row) for row in rows]

    async def count_projects(self, *, search: str | None = None) -> int:
        """How many projects `list_projects` would page through."""
        return int(await self._scalar(COUNT_PROJECTS, (like_pattern(search),)))

    async def update_project(
        self, project_id: str, changes: ProjectChanges, *, now: datetime
    ) -> Project | None:
        """Apply changes and set updated_at; None when the project is unknown."""
        params = (*_changes_params(changes), _to_text(now), project_id)
        try:
            async with self._write_lock:
                rows = await self._fetch_all(UPDATE_PROJECT, params)
        except sqlite3.IntegrityError as exc:
            _raise_if_duplicate_name(exc, changes.name)
            raise
        return _project(rows[0]) if rows else None

    async def delete_project(self, project_id: str) -> bool:
        """Delete a project and (by cascade) its tokens; False when unknown."""
        return await self._write(DELETE_PROJECT, (project_id,)) > 0

    async def create_token(self, token: Token) -> None:
        """Insert a token record; `RepositoryError` when its project is unknown."""
        try:
            await self._write(INSERT_TOKEN, _token_params(token))
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise RepositoryError(f"unknown project {token.project_id}") from exc
            raise

    async def get_token(self, token_id: str) -> Token | None:
        """One token by its public id."""
        row = await self._fetch_one(SELECT_TOKEN, (token_id,))
        return None if row is None else _token(row)

    async def get_token_by_hash(self, token_hash: str) -> Token | None:
        """One token by the HMAC of its value."""
        row = await self._fetch_one(SELECT_TOKEN_BY_HASH, (token_hash,))
        return None if row is None else _token(row)

    async def list_tokens(
        self, token_filter: TokenFilter, *, now: datetime, limit: int, offset: int
    ) -> list[Token]:
        """Tokens ordered by created_at descending then id."""
        check_page(limit, offset)
        params = (*_filter_params(token_filter, now), limit, offset)
        return [_token(row) for row in await self._fetch_all(LIST_TOKENS, params)]

    async def count_tokens(self, token_filter: TokenFilter, *, now: datetime) -> int:
        """How many tokens `list_tokens` would page through."""
        params = _filter_params(token_filter, now)
        return int(await self._scalar(COUNT_TOKENS, params))

    async def revoke_token(self, token_id: str) -> bool:
        """Set is_active false; False when the token is unknown (idempotent)."""
        return await self._write(REVOKE_TOKEN, (token_id,)) > 0

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        """Revoke every token of a project."""
        async with self._transaction():
            row = await self._fetch_one(COUNT_PROJECT_TOKENS, (project_id,))
            revoked = await self._run(REVOKE_PROJECT_TOKENS, (project_id,))
        assert row is not None  # an aggregate always returns one row
        return RevokeCounts(
            revoked_count=revoked,
            already_revoked_count=int(row[1]),
            total_tokens=int(row[0]),
        )

    async def record_token_usage(self, usage: Sequence[TokenUsage]) -> None:
        """Add request counts and move last_used_at forward, in one transaction."""
        if not usage:
            return
        params = [(u.requests, _to_text(u.last_used_at), u.token_id) for u in usage]
        async with self._transaction():
            await self._connection.executemany(RECORD_TOKEN_USAGE, params)

    async def change_mark(self) -> int:
        """The counter's next value: every later commit carries at least that."""
        return int(await self._scalar(CHANGE_MARK))

    async def load_tokens_changed_since(
        self,
        mark: int,
        *,
        after: ChangeCursor | None = None,
        limit: int,
        active_only: bool = False,
        unchanged: Callable[[str, int], bool] | None = None,
    ) -> ChangePage[Token]:
        """Tokens written with a marker >= `mark`, in marker order, from `after` on;
        rows `unchanged` reports as such are left out unconverted."""
        params = (*_cursor(mark, after), limit, active_only)
        rows = await self._fetch_all(TOKENS_CHANGED, params)
        if unchanged is None:
            tokens = [_token(row, row[CHANGE_SEQ]) for row in rows]
        else:
            tokens = [
                _token(row, row[CHANGE_SEQ])
                for row in rows
                if not unchanged(row[1], row[CHANGE_SEQ])  # token hash, marker
            ]
        return ChangePage(tokens, _next_cursor(rows, limit))

    async def load_projects_changed_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Project]:
        """Projects written with a marker >= `mark`, in marker order, from `after` on."""
        params = (*_cursor(mark, after), limit)
        rows = await self._fetch_all(PROJECTS_CHANGED, params)
        return ChangePage([_project(row) for row in rows], _next_cursor(rows, limit))

    async def load_deletions_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Deletion]:
        """Tombstones with a marker >= `mark`, in marker order, from `after` on."""
        params = (*_cursor(mark, after), limit)
        rows = await self._fetch_all(DELETIONS_SINCE, params)
        deletions = [Deletion(row["kind"], row["id"]) for row in rows]
        return ChangePage(deletions, _next_cursor(rows, limit))

    async def purge_deletions(self, *, before: datetime) -> int:
        """Forget tombstones older than `before`; return how many."""
        return await self._write(PURGE_DELETIONS, (_to_text(before),))

    @asynccontextmanager
    async def purge_lock(self, *, lease_s: float) -> AsyncIterator[bool]:
        """Hold the purge lease of every process on this file for the block."""
        now = datetime.now(UTC)
        lease = f"{_to_text(now + timedelta(seconds=lease_s))}|{uuid.uuid4().hex}"
        params = (PURGE_LOCK_KEY, lease, _to_text(now))
        taken = await self._write(TAKE_PURGE_LOCK, params) > 0
        try:
            yield taken
        finally:
            if taken:
                await self._write(RELEASE_PURGE_LOCK, (PURGE_LOCK_KEY, lease))

    async def count_purgeable(
        self, *, tokens_before: datetime | None, usage_before: datetime | None
    ) -> PurgeCounts:
        """What the purges would delete at these cut-offs (None: that kind is kept)."""
        tokens = usage_events = 0
        if tokens_before is not None:
            params = (_to_text(tokens_before),)
            tokens = int(await self._scalar(COUNT_PURGEABLE_TOKENS, params))
        if usage_before is not None:
            params = (_to_text(usage_before),)
            usage_events = int(await self._scalar(COUNT_OLD_USAGE_EVENTS, params))
        return PurgeCounts(tokens=tokens, usage_events=usage_events)

    async def purge_tokens(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` tokens expired or revoked before `before`."""
        return await self._write(PURGE_TOKENS, (_to_text(before), limit))

    async def purge_usage_events(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the oldest usage events with ts before `before`."""
        return await self._write(PURGE_USAGE_EVENTS, (_to_text(before), limit))

    async def insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert events, skipping event ids already stored; return rows inserted.

        Text is stored cleaned (`storable_usage_event`); rows the database cannot
        take raise `RejectedRowsError` (the whole call inserts nothing).
        """
        if not events:
            return 0
        try:
            return await self._insert_usage_events(events)
        except USAGE_DATA_ERRORS as exc:
            raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc

    async def _insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        events = [storable_usage_event(event) for event in events]
        chunks = [
            events[start : start + USAGE_ROWS_PER_INSERT]
            for start in range(0, len(events), USAGE_ROWS_PER_INSERT)
        ]
        if len(chunks) == 1:  # one statement is a transaction of its own
            sql, params = _usage_insert(chunks[0])
            return await self._write(sql, params)
        inserted = 0
        async with self._transaction():
            for chunk in chunks:
                sql, params = _usage_insert(chunk)
                inserted += await self._run(sql, params)
        return inserted

    async def usage_totals(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> UsageTotals:
        """Totals of events with since <= ts < until, optionally of one project/token."""
        params = _usage_where(since, until, project_id, token_id)
        row = await self._fetch_one(USAGE_TOTALS, params)
        assert row is not None  # an aggregate always returns one row
        return _usage_totals(tuple(row))

    async def usage_by_day(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> list[UsageRow]:
        """Totals per UTC day that has events, oldest first."""
        params = _usage_where(since, until, project_id, token_id)
        return _usage_rows(await self._fetch_all(USAGE_BY_DAY, params))

    async def usage_by_project(
        self, *, since: datetime, until: datetime, limit: int = 50
    ) -> list[UsageRow]:
        """Totals per project id, busiest first."""
        params = (*_usage_where(since, until, None, None), limit)
        return _usage_rows(await self._fetch_all(USAGE_BY_PROJECT, params))

    async def usage_by_token(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        limit: int = 50,
    ) -> list[UsageRow]:
        """Totals per token id, busiest first, optionally of one project."""
        params = (*_usage_where(since, until, project_id, None), limit)
        return _usage_rows(await self._fetch_all(USAGE_BY_TOKEN, params))

    async def recent_usage_events(
        self, limit: int, *, errors_only: bool = False
    ) -> list[UsageEvent]:
        """The newest events (only status >= 400 when `errors_only`)."""
        rows = await self._fetch_all(RECENT_USAGE_EVENTS, (errors_only, limit))
        return [_usage_event(row) for row in rows]

    @property
    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RepositoryError("SqliteRepository is not connected; call connect()")
        return self._conn

    async def _apply_if_pending(self, migration: Migration) -> bool:
        """Apply one migration unless applied (re-checked under the write lock)."""
        try:
            async with self._transaction():
                if await self._scalar(IS_APPLIED, (migration.version,)):
                    return False
                for statement in _statements(migration.sql):
                    await self._run(statement)
                applied_at = _to_text(datetime.now(UTC))
                version_row = (migration.version, migration.name, applied_at)
                await self._run(INSERT_SCHEMA_VERSION, version_row)
        except sqlite3.Error as exc:
            raise MigrationError(
                f"migration {migration.version:03d}_{migration.name} failed: {exc}"
            ) from exc
        log.info("applied migration %03d_%s", migration.version, migration.name)
        return True

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """Hold the write lock around BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""
        async with self._write_lock:
            await self._run(BEGIN)
            try:
                yield
                await self._run(COMMIT)
            except BaseException:
                if self._connection.in_transaction:  # also when COMMIT itself failed
                    await self._run(ROLLBACK)
                raise

    async def _write(self, sql: str, params: Params = ()) -> int:
        async with self._write_lock:
            return await self._run(sql, params)

    async def _write_many(self, sql: str, rows: Sequence[Params]) -> None:
        async with self._transaction():
            await self._connection.executemany(sql, rows)

    @staticmethod
    def _time(moment: datetime) -> str:
        return _to_text(moment)

    async def _run(self, sql: str, params: Params = ()) -> int:
        async with self._connection.execute(sql, params) as cursor:
            return cursor.rowcount

    async def _fetch_all(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return list(await self._connection.execute_fetchall(sql, params))

    async def _fetch_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        async with self._connection.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def _scalar(self, sql: str, params: Params = ()) -> Any:
        row = await self._fetch_one(sql, params)
        return None if row is None else row[0]


def _cursor(mark: int, after: ChangeCursor | None) -> Params:
    return (mark, START_ID) if after is None else after


def _next_cursor(rows: Sequence[sqlite3.Row], limit: int) -> ChangeCursor | None:
    """Where the next page starts; None when this page was not full (the last)."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    return (int(last["change_seq"]), str(last["id"]))


def _statements(script: str) -> Iterable[str]:
    """Split a migration script into single statements (triggers and quotes aware)."""
    buffer = ""
    *pieces, tail = script.split(";")
    for piece in pieces:
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if (buffer + tail).strip():
        yield buffer + tail


def _raise_if_duplicate_name(exc: sqlite3.IntegrityError, name: str | None) -> None:
    if "projects.name" in str(exc):
        raise DuplicateNameError(f"a project named {name!r} already exists") from exc


def _to_text(moment: datetime) -> str:
    if moment.tzinfo is UTC:  # the common case (a row per proxied call): no conversion
        return moment.isoformat(timespec="microseconds")[:-6] + "Z"
    if moment.tzinfo is None:
        raise ValueError("repository times must be timezone-aware")
    naive_utc = moment.astimezone(UTC).replace(tzinfo=None)
    return naive_utc.isoformat(timespec="microseconds") + "Z"


def _from_text(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _optional_time(text: str | None) -> datetime | None:
    return None if text is None else _from_text(text)


def _project_params(project: Project) -> Params:
    return (
        project.id,
        project.name,
        project.description,
        dump_metadata(project.metadata),
        project.encrypted_api_key,
        project.api_key_hint,
        project.is_active,
        _to_text(project.created_at),
        _to_text(project.updated_at),
        project.max_concurrent,
    )


def _changes_params(changes: ProjectChanges) -> Params:
    metadata = changes.metadata
    return (
        changes.name,
        changes.description,
        None if metadata is None else dump_metadata(metadata),
        changes.encrypted_api_key,
        changes.api_key_hint,
        changes.is_active,
        changes.clear_max_concurrent,
        changes.max_concurrent,
    )


def _project(row: sqlite3.Row) -> Project:
    return Project(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        metadata=load_metadata(row["metadata"]),
        encrypted_api_key=row["openai_api_key"],
        api_key_hint=row["api_key_hint"],
        is_active=bool(row["is_active"]),
        created_at=_from_text(row["created_at"]),
        updated_at=_from_text(row["updated_at"]),
        max_concurrent=row["max_concurrent"],
    )


def _token_params(token: Token) -> Params:
    return (
        token.id,
        token.token_hash,
        token.token_hint,
        token.project_id,
        _to_text(token.expires_at),
        token.is_active,
        token.request_count,
        token.max_requests,
        token.rate_limit_per_hour,
        _to_text(token.created_at),
        None if token.last_used_at is None else _to_text(token.last_used_at),
        token.max_concurrent,
    )


def _filter_params(token_filter: TokenFilter, now: datetime) -> Params:
    return (token_filter.project_id, token_filter.active, _to_text(now))


def _token(row: sqlite3.Row, change_seq: int | None = None) -> Token:
    # By position (TOKEN_COLUMNS order, which every token query selects first): a
    # reload converts up to a page of rows per loop slice, and names cost twice as much.
    return Token(
        id=row[0],
        token_hash=row[1],
        token_hint=row[2],
        project_id=row[3],
        expires_at=_from_text(row[4]),
        is_active=bool(row[5]),
        request_count=row[6],
        max_requests=row[7],
        rate_limit_per_hour=row[8],
        created_at=_from_text(row[9]),
        last_used_at=_optional_time(row[10]),
        max_concurrent=row[11],
        change_seq=change_seq,
    )


def _usage_insert(events: Sequence[UsageEvent]) -> tuple[str, Params]:
    """The multi-row INSERT for up to USAGE_ROWS_PER_INSERT events, and its values."""
    sql = insert_usage_events_sql(len(events))
    return sql, tuple(value for event in events for value in _usage_params(event))


def _usage_params(event: UsageEvent) -> Params:
    return (
        event.event_id,
        _to_text(event.ts),
        event.project_id,
        event.token_id,
        event.endpoint,
        event.method,
        event.model,
        event.status_code,
        event.duration_ms,
        event.prompt_tokens,
        event.completion_tokens,
        event.total_tokens,
        event.usage_source,
    )


def _usage_where(
    since: datetime, until: datetime, project_id: str | None, token_id: str | None
) -> Params:
    return (_to_text(since), _to_text(until), project_id, token_id)


def _usage_totals(sums: Sequence[Any]) -> UsageTotals:
    return UsageTotals(*(int(value) for value in sums))


def _usage_rows(rows: Iterable[sqlite3.Row]) -> list[UsageRow]:
    return [UsageRow(str(row[0]), _usage_totals(tuple(row)[1:])) for row in rows]


def _usage_event(row: sqlite3.Row) -> UsageEvent:
    return UsageEvent(
        event_id=row["event_id"],
        ts=_from_text(row["ts"]),
        project_id=row["project_id"],
        token_id=row["token_id"],
        endpoint=row["endpoint"],
        method=row["method"],
        model=row["model"],
        status_code=row["status_code"],
        duration_ms=row["duration_ms"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        total_tokens=row["total_tokens"],
        usage_source=row["usage_source"],
    )
