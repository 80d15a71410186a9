"""PostgreSQL storage: an asyncpg pool, and PostgreSQL's own SQL.

Ids are UUID columns (an id that is not a UUID simply matches nothing); times are
TIMESTAMPTZ; metadata is JSONB. Migrations run under a session advisory lock, so
processes that start together apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from ._common import load_metadata, load_origins, load_policy
from .audit_sql import AuditBackend, audit_statements
from .backend import Params
from .base import ChangeCursor, Project, RevokeCounts, Token, TokenUsage, UsageEvent
from .migrations import SQL_DIR, Migration, load_migrations, migration_failed, pending
from .statements import USAGE_FIELDS, USAGE_VALUES, Dialect

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

POSTGRES: Final = Dialect(
    name="postgres",
    like="ILIKE",
    day="to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
)
SQL: Final = POSTGRES.statements()
# Any constant bigint works; it only has to be the same in every process.
MIGRATION_LOCK_KEY: Final = 0x6C6C6D5F70726F78  # "llm_prox"
NAME_CONSTRAINT: Final = "projects_name_key"

ADVISORY_LOCK: Final = "SELECT pg_advisory_lock($1)"
ADVISORY_UNLOCK: Final = "SELECT pg_advisory_unlock($1)"
CREATE_SCHEMA_VERSION: Final = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""
HAS_SCHEMA_VERSION: Final = "SELECT to_regclass('schema_version') IS NOT NULL"
SELECT_SCHEMA_VERSION: Final = SQL.select_schema_version
SELECT_APPLIED_VERSIONS: Final = "SELECT version FROM schema_version"
INSERT_SCHEMA_VERSION: Final = (
    "INSERT INTO schema_version (version, name) VALUES ($1, $2)"
)
PING: Final = SQL.ping

# The outer count reads the snapshot from before the UPDATE, so it sees every token.
REVOKE_PROJECT_TOKENS: Final = """
WITH revoked AS (
    UPDATE tokens SET is_active = false
    WHERE project_id = $1 AND is_active
    RETURNING 1
)
SELECT (SELECT count(*) FROM revoked) AS revoked,
       (SELECT count(*) FROM tokens WHERE project_id = $1) AS total"""
# Change markers (migration 004, which explains them): rows and tombstones carry the
# id of the writing transaction; the mark is the xmin of the reader's snapshot, below
# which every transaction has finished.
CHANGE_MARK: Final = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
START_ID: Final = uuid.UUID(int=0)  # sorts before every generated id
# Retention: $1 the cut-off, $2 the batch size. Each batch is one autocommitted
# DELETE by primary key; SKIP LOCKED passes over tokens a usage flush is writing (the
# next run takes them).
PURGE_TOKENS: Final = POSTGRES.render("""
WITH doomed AS (
    SELECT id FROM tokens WHERE {purgeable_tokens} LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM tokens USING doomed WHERE tokens.id = doomed.id""")
PURGE_USAGE_EVENTS: Final = """
WITH doomed AS (
    SELECT event_id FROM usage_events WHERE ts < $1 ORDER BY ts LIMIT $2
)
DELETE FROM usage_events USING doomed WHERE usage_events.event_id = doomed.event_id"""
# The purge lock: a transaction-level advisory lock, held by a transaction left open
# on one connection while the batches commit on others. It ends with that transaction
# or its connection (a crashed holder frees it), and works behind a transaction-mode
# pooler, where a session lock and its unlock may reach different server sessions.
PURGE_LOCK_KEY: Final = 0x6C6C6D5F70757267  # "llm_purg"
TRY_PURGE_LOCK: Final = "SELECT pg_try_advisory_xact_lock($1)"
# A holder that hangs is cut off by the server once idle in its transaction this long.
SET_LOCK_LEASE: Final = (
    "SELECT set_config('idle_in_transaction_session_timeout', $1, true)"
)

# One statement for the whole batch (its command tag counts the rows inserted); the
# arrays follow USAGE_FIELDS.
INSERT_USAGE_EVENTS: Final = POSTGRES.render("""
INSERT INTO usage_events ({usage_columns})
SELECT * FROM unnest(
    $1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
    $7::integer[], $8::double precision[], $9::text[], $10::integer[],
    $11::integer[], $12::integer[], $13::text[]
)
ON CONFLICT (event_id) DO NOTHING""")
USAGE_IDS: Final = (USAGE_FIELDS.index("project_id"), USAGE_FIELDS.index("token_id"))
# Errors that blame the rows, not the connection: SQLSTATE classes 22 (data), 23
# (integrity) and 54 (a value over a limit), and asyncpg's own argument encoding
# errors (ValueError) before anything is sent.
USAGE_DATA_ERRORS: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
    TypeError,
    OverflowError,
)


# A token row from expires_at to max_concurrent, as asyncpg returns it.
TokenTail = tuple[
    datetime, bool, int, int | None, int | None, datetime, datetime | None, int | None
]


class PostgresRepository(AuditBackend):
    """`Repository` on an asyncpg connection pool."""

    _sql = SQL
    _audit_sql = audit_statements(POSTGRES)
    _integrity_error = asyncpg.IntegrityConstraintViolationError
    _usage_data_errors = USAGE_DATA_ERRORS

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        sql_dir: Path | None = None,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        close_timeout_s: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema  # used as the connections' search_path when given
        self._sql_dir = sql_dir
        self._pool_min_size = pool_min_size
        self._pool_max_size = pool_max_size
        self._close_timeout_s = close_timeout_s
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        # The DSN stays out: it may hold a password.
        return f"PostgresRepository(schema={self._schema!r})"

    async def connect(self) -> None:
        """Create the connection pool."""
        if self._pool is not None:
            return
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=self._pool_min_size,
            max_size=self._pool_max_size,
            server_settings=_server_settings(self._schema),
        )

    async def close(self) -> None:
        """Close the pool, waiting up to close_timeout_s before terminating it.

        Safe to call twice. Connections still checked out when the timeout expires
        are closed abruptly, as asyncpg's `Pool.close` docstring recommends.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._close_timeout_s)
        except TimeoutError:
            log.warning("PostgreSQL pool did not close in time; terminating it")
            pool.terminate()

    async def migrate(self) -> list[int]:
        """Apply pending migrations, each in a transaction, under an advisory lock."""
        migrations = load_migrations(self._sql_dir or SQL_DIR, POSTGRES.name)
        async with self._connected.acquire() as con:
            await con.execute(ADVISORY_LOCK, MIGRATION_LOCK_KEY)
            try:
                return await _apply_pending(con, migrations)
            finally:
                await con.execute(ADVISORY_UNLOCK, MIGRATION_LOCK_KEY)

    async def schema_version(self) -> int:
        if not await self._connected.fetchval(HAS_SCHEMA_VERSION):
            return 0
        return int(await self._connected.fetchval(SELECT_SCHEMA_VERSION))

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        key = _uuid(project_id)
        if key is None:
            return RevokeCounts(
                revoked_count=0, already_revoked_count=0, total_tokens=0
            )
        row = await self._connected.fetchrow(REVOKE_PROJECT_TOKENS, key)
        assert row is not None  # counts: always one row
        revoked, total = int(row["revoked"]), int(row["total"])
        return RevokeCounts(
            revoked_count=revoked,
            already_revoked_count=total - revoked,
            total_tokens=total,
        )

    async def change_mark(self) -> int:
        """The snapshot's xmin: every transaction below it has finished."""
        return int(await self._connected.fetchval(CHANGE_MARK))

    @asynccontextmanager
    async def purge_lock(self, *, lease_s: float) -> AsyncIterator[bool]:
        """Hold the purge advisory lock of every process on this database.

        On a connection of its own, outside the pool: the batches need the pool's
        connections meanwhile, and a pool of one would otherwise wait forever.
        """
        _ = self._connected  # not connected: raise, as every other method does
        con = await asyncpg.connect(
            self._dsn, server_settings=_server_settings(self._schema)
        )
        try:
            async with con.transaction():
                lease = f"{max(1, round(lease_s * 1000))}ms"
                await con.fetchval(SET_LOCK_LEASE, lease)
                taken = bool(await con.fetchval(TRY_PURGE_LOCK, PURGE_LOCK_KEY))
                # A simple-protocol statement drops the portal of the last one, and
                # with it its snapshot: the idle transaction holds back no VACUUM.
                await con.execute(PING)
                yield taken
        finally:
            await con.close()

    async def purge_tokens(self, *, before: datetime, limit: int) -> int:
        return _affected(await self._connected.execute(PURGE_TOKENS, before, limit))

    async def purge_usage_events(self, *, before: datetime, limit: int) -> int:
        status = await self._connected.execute(PURGE_USAGE_EVENTS, before, limit)
        return _affected(status)

    async def _insert_usage(self, events: Sequence[UsageEvent]) -> int:
        columns = list(zip(*map(USAGE_VALUES, events), strict=True))
        for index in USAGE_IDS:
            columns[index] = tuple(map(_optional_uuid, columns[index]))
        return _affected(await self._connected.execute(INSERT_USAGE_EVENTS, *columns))

    # -- values and rows -------------------------------------------------------------

    @staticmethod
    def _key(text: str) -> uuid.UUID | None:
        return _uuid(text)

    @staticmethod
    def _time(moment: datetime) -> datetime:
        return moment

    @staticmethod
    def _cursor(mark: int, after: ChangeCursor | None) -> Params:
        if after is None:
            return (mark, START_ID)
        return (after[0], uuid.UUID(after[1]))

    @staticmethod
    def _project(row: asyncpg.Record) -> Project:
        # PROJECT_COLUMNS order; only the id and the JSON columns need converting.
        metadata = load_metadata(row[3])
        key, hint, active, created, updated, cap, ttl = row[4:11]
        origins = load_origins(row[11])
        return Project(
            str(row[0]),
            row[1],
            row[2],
            metadata,
            key,
            hint,
            active,
            created,
            updated,
            cap,
            ttl,
            origins,
            row[12],
            load_policy(row[13]),
        )

    @staticmethod
    def _token(row: asyncpg.Record, change_seq: int | None = None) -> Token:
        # TOKEN_COLUMNS order, by position (see SqliteRepository._token); only the
        # UUIDs and the policy need converting.
        rest: TokenTail = row[4:12]
        policy = load_policy(row[12])
        return Token(
            str(row[0]), row[1], row[2], str(row[3]), *rest, policy, change_seq
        )

    @staticmethod
    def _usage_event(row: asyncpg.Record) -> UsageEvent:
        project_id, token_id = _optional_text(row[2]), _optional_text(row[3])
        return UsageEvent(row[0], row[1], project_id, token_id, *row[4:])

    @staticmethod
    def _token_usage(usage: Sequence[TokenUsage]) -> list[Params]:
        return [
            (key, u.requests, u.last_used_at)
            for u in usage
            if (key := _uuid(u.token_id)) is not None
        ]

    @staticmethod
    def _is_duplicate_name(exc: Exception) -> bool:
        return getattr(exc, "constraint_name", None) == NAME_CONSTRAINT

    @staticmethod
    def _is_unknown_project(exc: Exception) -> bool:
        return isinstance(exc, asyncpg.ForeignKeyViolationError)

    # -- the pool --------------------------------------------------------------------

    @property
    def _connected(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise self._not_connected()
        return self._pool

    async def _fetch_one(self, sql: str, params: Params = ()) -> asyncpg.Record | None:
        return await self._connected.fetchrow(sql, *params)

    async def _fetch_all(self, sql: str, params: Params = ()) -> list[asyncpg.Record]:
        return await self._connected.fetch(sql, *params)

    async def _scalar(self, sql: str, params: Params = ()) -> Any:
        return await self._connected.fetchval(sql, *params)

    async def _write(self, sql: str, params: Params = ()) -> int:
        return _affected(await self._connected.execute(sql, *params))

    async def _write_returning(self, sql: str, params: Params) -> asyncpg.Record | None:
        return await self._connected.fetchrow(sql, *params)

    async def _write_many(self, sql: str, rows: Sequence[Params]) -> None:
        async with self._connected.acquire() as con, con.transaction():
            await con.executemany(sql, rows)


async def _apply_pending(
    con: PoolConnectionProxy[asyncpg.Record], migrations: Sequence[Migration]
) -> list[int]:
    """Apply what schema_version lacks; the caller holds the advisory lock."""
    await con.execute(CREATE_SCHEMA_VERSION)
    applied = {row["version"] for row in await con.fetch(SELECT_APPLIED_VERSIONS)}
    versions: list[int] = []
    for migration in pending(migrations, applied):
        await _apply(con, migration)
        versions.append(migration.version)
    return versions


async def _apply(
    con: PoolConnectionProxy[asyncpg.Record], migration: Migration
) -> None:
    try:
        async with con.transaction():
            await con.execute(migration.sql)
            await con.execute(INSERT_SCHEMA_VERSION, migration.version, migration.name)
    except asyncpg.PostgresError as exc:
        raise migration_failed(migration, exc) from exc
    log.info("applied migration %03d_%s", migration.version, migration.name)


def _server_settings(schema: str | None) -> dict[str, str] | None:
    if schema is None:
        return None
    return {"search_path": '"' + schema.replace('"', '""') + '"'}


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _optional_uuid(text: str | None) -> uuid.UUID | None:
    return None if text is None else _uuid(text)


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _affected(status: str) -> int:
    """Row count from a command tag such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])
