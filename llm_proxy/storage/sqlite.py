"""SQLite storage: one aiosqlite connection in WAL mode, and SQLite's own SQL.

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
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, Final

import aiosqlite

from ..clock import utc_iso
from ..private_files import create_private_file
from ._common import load_metadata, load_origins, load_policy
from .audit_sql import AuditBackend, audit_statements
from .backend import Params
from .base import ChangeCursor, Project, RevokeCounts, Token, TokenUsage, UsageEvent
from .migrations import SQL_DIR, Migration, load_migrations, migration_failed
from .statements import USAGE_COLUMNS, USAGE_FIELDS, USAGE_VALUES, Dialect

log = logging.getLogger(__name__)

SQLITE: Final = Dialect(
    name="sqlite",
    like="LIKE",  # ignores the case of ASCII letters already
    day="substr(ts, 1, 10)",  # the text starts with the UTC date
    question_marks=True,
)
SQL: Final = SQLITE.statements()

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
SELECT_SCHEMA_VERSION: Final = SQL.select_schema_version
IS_APPLIED: Final = "SELECT count(*) FROM schema_version WHERE version = ?"
INSERT_SCHEMA_VERSION: Final = (
    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)"
)

COUNT_PROJECT_TOKENS: Final = (
    "SELECT count(*), coalesce(sum(is_active = 0), 0) FROM tokens WHERE project_id = ?"
)
REVOKE_PROJECT_TOKENS: Final = (
    "UPDATE tokens SET is_active = 0 WHERE project_id = ? AND is_active = 1"
)
# Change markers (migration 004): rows and tombstones carry the counter value of the
# write; every later commit gets a larger one, so the next value is the mark.
CHANGE_MARK: Final = "SELECT seq + 1 FROM change_counter WHERE id = 1"
START_ID: Final = ""  # sorts before every id, so (mark, START_ID) starts at `mark`
# Retention: $1 the cut-off, $2 the batch size. Each batch is one DELETE, its own
# short write transaction; rows go by rowid.
PURGE_TOKENS: Final = SQLITE.render(
    "DELETE FROM tokens WHERE rowid IN"
    " (SELECT rowid FROM tokens WHERE {purgeable_tokens} LIMIT $2)"
)
PURGE_USAGE_EVENTS: Final = (
    "DELETE FROM usage_events WHERE rowid IN"
    " (SELECT rowid FROM usage_events WHERE ts < ?1 ORDER BY ts LIMIT ?2)"
)
# The purge lock is a lease in `meta`, "<expiry>|<holder>", taken when absent or
# expired: SQLite has no lock that ends with a connection, and a lease also ends when
# its holder dies. The expiry is the value's first 27 characters (fixed-width time).
PURGE_LOCK_KEY: Final = "purge_lock"
TAKE_PURGE_LOCK: Final = SQL.upsert_meta + " WHERE substr(meta.value, 1, 27) < ?3"
RELEASE_PURGE_LOCK: Final = "DELETE FROM meta WHERE key = ?1 AND value = ?2"

USAGE_WIDTH: Final = len(USAGE_FIELDS)
USAGE_TS: Final = USAGE_FIELDS.index("ts")
USAGE_ROW: Final = "(" + ", ".join(["?"] * USAGE_WIDTH) + ")"
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


class SqliteRepository(AuditBackend):
    """`Repository` on one aiosqlite connection to a database file."""

    _sql = SQL
    _audit_sql = audit_statements(SQLITE)
    _integrity_error = sqlite3.IntegrityError
    _usage_data_errors = USAGE_DATA_ERRORS

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
        migrations = load_migrations(self._sql_dir or SQL_DIR, SQLITE.name)
        await self._write(CREATE_SCHEMA_VERSION)
        return [m.version for m in migrations if await self._apply_if_pending(m)]

    async def schema_version(self) -> int:
        if not await self._scalar(HAS_SCHEMA_VERSION):
            return 0
        return int(await self._scalar(SELECT_SCHEMA_VERSION))

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        async with self._transaction():
            row = await self._fetch_one(COUNT_PROJECT_TOKENS, (project_id,))
            revoked = await self._run(REVOKE_PROJECT_TOKENS, (project_id,))
        assert row is not None  # an aggregate always returns one row
        return RevokeCounts(
            revoked_count=revoked,
            already_revoked_count=int(row[1]),
            total_tokens=int(row[0]),
        )

    async def change_mark(self) -> int:
        """The counter's next value: every later commit carries at least that."""
        return int(await self._scalar(CHANGE_MARK))

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

    async def purge_tokens(self, *, before: datetime, limit: int) -> int:
        return await self._write(PURGE_TOKENS, (_to_text(before), limit))

    async def purge_usage_events(self, *, before: datetime, limit: int) -> int:
        return await self._write(PURGE_USAGE_EVENTS, (_to_text(before), limit))

    async def _insert_usage(self, events: Sequence[UsageEvent]) -> int:
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

    # -- values and rows -------------------------------------------------------------

    @staticmethod
    def _key(text: str) -> str:
        return text  # ids are text

    @staticmethod
    def _time(moment: datetime) -> str:
        return _to_text(moment)

    @staticmethod
    def _cursor(mark: int, after: ChangeCursor | None) -> Params:
        return (mark, START_ID) if after is None else after

    @staticmethod
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
            cache_ttl_seconds=row["cache_ttl_seconds"],
            allowed_origins=load_origins(row["allowed_origins"]),
            require_origin=bool(row["require_origin"]),
            policy=load_policy(row["policy"]),
        )

    @staticmethod
    def _token(row: sqlite3.Row, change_seq: int | None = None) -> Token:
        # By position (TOKEN_COLUMNS order, which every token query selects first): a
        # reload converts up to a page of rows per loop slice, and names cost twice as
        # much.
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
            policy=load_policy(row[12]),
            change_seq=change_seq,
        )

    @staticmethod
    def _usage_event(row: sqlite3.Row) -> UsageEvent:
        return UsageEvent(row[0], _from_text(row[1]), *row[2:])  # USAGE_FIELDS order

    @staticmethod
    def _token_usage(usage: Sequence[TokenUsage]) -> list[Params]:
        return [(u.token_id, u.requests, _to_text(u.last_used_at)) for u in usage]

    @staticmethod
    def _is_duplicate_name(exc: Exception) -> bool:
        return "projects.name" in str(exc)

    @staticmethod
    def _is_unknown_project(exc: Exception) -> bool:
        return "FOREIGN KEY" in str(exc)

    # -- the connection --------------------------------------------------------------

    @property
    def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise self._not_connected()
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
            raise migration_failed(migration, exc) from exc
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

    async def _write_returning(self, sql: str, params: Params) -> sqlite3.Row | None:
        async with self._write_lock:
            rows = await self._fetch_all(sql, params)
        return rows[0] if rows else None

    async def _write_many(self, sql: str, rows: Sequence[Params]) -> None:
        async with self._transaction():
            await self._connection.executemany(sql, rows)

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


def _to_text(moment: datetime) -> str:
    return utc_iso(moment, "microseconds")


def _from_text(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _optional_time(text: str | None) -> datetime | None:
    return None if text is None else _from_text(text)


def _usage_insert(events: Sequence[UsageEvent]) -> tuple[str, Params]:
    """The multi-row INSERT for up to USAGE_ROWS_PER_INSERT events, and its values."""
    values = list(chain.from_iterable(map(USAGE_VALUES, events)))
    values[USAGE_TS::USAGE_WIDTH] = map(_to_text, values[USAGE_TS::USAGE_WIDTH])
    return insert_usage_events_sql(len(events)), values
