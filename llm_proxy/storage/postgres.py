"""PostgreSQL storage: an asyncpg pool and every PostgreSQL SQL string.

Ids are UUID columns (an id that is not a UUID simply matches nothing); times are
TIMESTAMPTZ; metadata is JSONB. Migrations run under a session advisory lock, so
processes that start together apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from ._common import (
    check_page,
    dump_metadata,
    like_pattern,
    load_metadata,
    storable_usage_event,
)
from .audit_sql import AuditMethods, Params, audit_statements
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
from .migrations import SQL_DIR, Migration, load_migrations, pending

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

DIALECT: Final = "postgres"
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
SELECT_SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM schema_version"
SELECT_APPLIED_VERSIONS: Final = "SELECT version FROM schema_version"
INSERT_SCHEMA_VERSION: Final = (
    "INSERT INTO schema_version (version, name) VALUES ($1, $2)"
)

PING: Final = "SELECT 1"
SELECT_META: Final = "SELECT value FROM meta WHERE key = $1"
UPSERT_META: Final = (
    "INSERT INTO meta (key, value) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

PROJECT_COLUMNS: Final = (
    "id, name, description, metadata, openai_api_key, api_key_hint, is_active,"
    " created_at, updated_at, max_concurrent"
)
INSERT_PROJECT: Final = (
    f"INSERT INTO projects ({PROJECT_COLUMNS})"
    " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10)"
)
SELECT_PROJECT: Final = f"SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"
SEARCH_PROJECTS: Final = "($1::text IS NULL OR name ILIKE $1 ESCAPE '\\')"
LIST_PROJECTS: Final = (
    f"SELECT {PROJECT_COLUMNS} FROM projects WHERE {SEARCH_PROJECTS}"
    " ORDER BY created_at, id LIMIT $2 OFFSET $3"
)
COUNT_PROJECTS: Final = f"SELECT count(*) FROM projects WHERE {SEARCH_PROJECTS}"
UPDATE_PROJECT: Final = f"""
UPDATE projects SET
    name = coalesce($2, name),
    description = coalesce($3, description),
    metadata = coalesce($4::jsonb, metadata),
    openai_api_key = coalesce($5, openai_api_key),
    api_key_hint = coalesce($6, api_key_hint),
    is_active = coalesce($7, is_active),
    max_concurrent = CASE WHEN $8 THEN NULL ELSE coalesce($9, max_concurrent) END,
    updated_at = $10
WHERE id = $1
RETURNING {PROJECT_COLUMNS}"""
DELETE_PROJECT: Final = "DELETE FROM projects WHERE id = $1"

TOKEN_COLUMNS: Final = (
    "id, token, token_hint, project_id, expires_at, is_active, request_count,"
    " max_requests, rate_limit_per_hour, created_at, last_used_at, max_concurrent"
)
INSERT_TOKEN: Final = (
    f"INSERT INTO tokens ({TOKEN_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
)
SELECT_TOKEN: Final = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"
SELECT_TOKEN_BY_HASH: Final = f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token = $1"
# $1 project id or NULL; $2 wanted liveness or NULL; $3 now. Custom plans (chosen
# while they beat the generic plan) fold the NULL tests away, so each filter shape
# can reach tokens_project_status_created_idx or tokens_created_at_idx.
FILTER_TOKENS: Final = (
    "($1::uuid IS NULL OR project_id = $1)"
    " AND ($2::boolean IS NULL OR $2 = (is_active AND expires_at > $3))"
)
LIST_TOKENS: Final = (
    f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE {FILTER_TOKENS}"
    " ORDER BY created_at DESC, id LIMIT $4 OFFSET $5"
)
COUNT_TOKENS: Final = f"SELECT count(*) FROM tokens WHERE {FILTER_TOKENS}"
REVOKE_TOKEN: Final = "UPDATE tokens SET is_active = false WHERE id = $1"
# The outer count reads the snapshot from before the UPDATE, so it sees every token.
REVOKE_PROJECT_TOKENS: Final = """
WITH revoked AS (
    UPDATE tokens SET is_active = false
    WHERE project_id = $1 AND is_active
    RETURNING 1
)
SELECT (SELECT count(*) FROM revoked) AS revoked,
       (SELECT count(*) FROM tokens WHERE project_id = $1) AS total"""
RECORD_TOKEN_USAGE: Final = (
    "UPDATE tokens SET request_count = request_count + $2,"
    " last_used_at = greatest(last_used_at, $3) WHERE id = $1"
)
# Change markers (migration 004, which explains them): rows and tombstones carry the
# id of the writing transaction; the mark is the xmin of the reader's snapshot, below
# which every transaction has finished. Pages are read by keyset on (change_seq, id):
# $1 $2 the cursor, $3 the page size.
CHANGE_MARK: Final = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
START_ID: Final = uuid.UUID(int=0)  # sorts before every generated id
CHANGE_SEQ: Final = 12  # the position of change_seq in a TOKENS_CHANGED row
TOKENS_CHANGED: Final = (
    f"SELECT {TOKEN_COLUMNS}, change_seq FROM tokens"
    " WHERE (change_seq, id) > ($1, $2) AND (NOT $4 OR is_active)"
    " ORDER BY change_seq, id LIMIT $3"
)
PROJECTS_CHANGED: Final = (
    f"SELECT {PROJECT_COLUMNS}, change_seq FROM projects"
    " WHERE (change_seq, id) > ($1, $2) ORDER BY change_seq, id LIMIT $3"
)
DELETIONS_SINCE: Final = (
    "SELECT kind, id, change_seq FROM deletions"
    " WHERE (change_seq, id) > ($1, $2) ORDER BY change_seq, id LIMIT $3"
)
PURGE_DELETIONS: Final = "DELETE FROM deletions WHERE deleted_at < $1"
# Retention (migration 005 dates revocations): $1 the cut-off, $2 the batch size. Each
# batch is one autocommitted DELETE by primary key; SKIP LOCKED passes over tokens a
# usage flush is writing (the next run takes them).
PURGEABLE_TOKENS: Final = "expires_at < $1 OR (NOT is_active AND revoked_at < $1)"
COUNT_PURGEABLE_TOKENS: Final = f"SELECT count(*) FROM tokens WHERE {PURGEABLE_TOKENS}"
PURGE_TOKENS: Final = f"""
WITH doomed AS (
    SELECT id FROM tokens WHERE {PURGEABLE_TOKENS} LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM tokens USING doomed WHERE tokens.id = doomed.id"""
COUNT_OLD_USAGE_EVENTS: Final = "SELECT count(*) FROM usage_events WHERE ts < $1"
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

USAGE_COLUMNS: Final = (
    "event_id, ts, project_id, token_id, endpoint, method, model, status_code,"
    " duration_ms, prompt_tokens, completion_tokens, total_tokens, usage_source"
)
# One statement for the whole batch (its command tag counts the rows inserted).
INSERT_USAGE_EVENTS: Final = f"""
INSERT INTO usage_events ({USAGE_COLUMNS})
SELECT * FROM unnest(
    $1::text[], $2::timestamptz[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
    $7::text[], $8::integer[], $9::double precision[], $10::integer[],
    $11::integer[], $12::integer[], $13::text[]
)
ON CONFLICT (event_id) DO NOTHING"""
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
# $1 since, $2 until, $3 project id or NULL, $4 token id or NULL.
USAGE_WHERE: Final = (
    "ts >= $1 AND ts < $2 AND ($3::uuid IS NULL OR project_id = $3)"
    " AND ($4::uuid IS NULL OR token_id = $4)"
)
USAGE_SUMS: Final = (
    "count(*), count(*) FILTER (WHERE status_code >= 400),"
    " coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
    " coalesce(sum(total_tokens), 0)"
)
USAGE_TOTALS: Final = f"SELECT {USAGE_SUMS} FROM usage_events WHERE {USAGE_WHERE}"
USAGE_BY_DAY: Final = (
    "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day,"
    f" {USAGE_SUMS} FROM usage_events WHERE {USAGE_WHERE} GROUP BY day ORDER BY day"
)
USAGE_BY_PROJECT: Final = (
    f"SELECT project_id, {USAGE_SUMS} FROM usage_events"
    f" WHERE {USAGE_WHERE} AND project_id IS NOT NULL"
    " GROUP BY project_id ORDER BY count(*) DESC, project_id LIMIT $5"
)
USAGE_BY_TOKEN: Final = (
    f"SELECT token_id, {USAGE_SUMS} FROM usage_events"
    f" WHERE {USAGE_WHERE} AND token_id IS NOT NULL"
    " GROUP BY token_id ORDER BY count(*) DESC, token_id LIMIT $5"
)
RECENT_USAGE_EVENTS: Final = (
    f"SELECT {USAGE_COLUMNS} FROM usage_events"
    " WHERE (NOT $1 OR status_code >= 400) ORDER BY ts DESC, event_id LIMIT $2"
)


class PostgresRepository(AuditMethods):
    """`Repository` on an asyncpg connection pool."""

    _audit_sql = audit_statements("postgres")
    _audit_data_errors = USAGE_DATA_ERRORS

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
        migrations = load_migrations(self._sql_dir or SQL_DIR, DIALECT)
        async with self._connected.acquire() as con:
            await con.execute(ADVISORY_LOCK, MIGRATION_LOCK_KEY)
            try:
                return await _apply_pending(con, migrations)
            finally:
                await con.execute(ADVISORY_UNLOCK, MIGRATION_LOCK_KEY)

    async def schema_version(self) -> int:
        """Highest applied migration version (0 when none)."""
        if not await self._connected.fetchval(HAS_SCHEMA_VERSION):
            return 0
        return int(await self._connected.fetchval(SELECT_SCHEMA_VERSION))

    async def ping(self) -> None:
        """Raise if the database does not answer."""
        await self._connected.fetchval(PING)

    async def get_meta(self, key: str) -> str | None:
        """Read a server-wide value."""
        value = await self._connected.fetchval(SELECT_META, key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        """Write a server-wide value, replacing any previous one."""
        await self._connected.execute(UPSERT_META, key, value)

    async def create_project(self, project: Project) -> None:
        """Insert a project; `DuplicateNameError` when the name is taken."""
        try:
            await self._connected.execute(INSERT_PROJECT, *_project_args(project))
        except asyncpg.UniqueViolationError as exc:
            _raise_if_duplicate_name(exc, project.name)
            raise

    async def get_project(self, project_id: str) -> Project | None:
        """One project by id."""
        key = _uuid(project_id)
        if key is None:
            return None
        row = await self._connected.fetchrow(SELECT_PROJECT, key)
        return None if row is None else _project(row)

    async def list_projects(
        self, *, limit: int, offset: int, search: str | None = None
    ) -> list[Project]:
        """Projects ordered by created_at then id; `search` matches name substrings."""
        check_page(limit, offset)
        pattern = like_pattern(search)
        rows = await self._connected.fetch(LIST_PROJECTS, pattern, limit, offset)
        return [_project(row) for row in rows]

    async def count_projects(self, *, search: str | None = None) -> int:
        """How many projects `list_projects` would page through."""
        return int(await self._connected.fetchval(COUNT_PROJECTS, like_pattern(search)))

    async def update_project(
        self, project_id: str, changes: ProjectChanges, *, now: datetime
    ) -> Project | None:
        """Apply changes and set updated_at; None when the project is unknown."""
        key = _uuid(project_id)
        if key is None:
            return None
        args = (key, *_changes_args(changes), now)
        try:
            row = await self._connected.fetchrow(UPDATE_PROJECT, *args)
        except asyncpg.UniqueViolationError as exc:
            _raise_if_duplicate_name(exc, changes.name)
            raise
        return None if row is None else _project(row)

    async def delete_project(self, project_id: str) -> bool:
        """Delete a project and (by cascade) its tokens; False when unknown."""
        key = _uuid(project_id)
        if key is None:
            return False
        return _affected(await self._connected.execute(DELETE_PROJECT, key)) > 0

    async def create_token(self, token: Token) -> None:
        """Insert a token record; `RepositoryError` when its project is unknown."""
        try:
            await self._connected.execute(INSERT_TOKEN, *_token_args(token))
        except asyncpg.ForeignKeyViolationError as exc:
            raise RepositoryError(f"unknown project {token.project_id}") from exc

    async def get_token(self, token_id: str) -> Token | None:
        """One token by its public id."""
        key = _uuid(token_id)
        if key is None:
            return None
        row = await self._connected.fetchrow(SELECT_TOKEN, key)
        return None if row is None else _token(row)

    async def get_token_by_hash(self, token_hash: str) -> Token | None:
        """One token by the HMAC of its value."""
        row = await self._connected.fetchrow(SELECT_TOKEN_BY_HASH, token_hash)
        return None if row is None else _token(row)

    async def list_tokens(
        self, token_filter: TokenFilter, *, now: datetime, limit: int, offset: int
    ) -> list[Token]:
        """Tokens ordered by created_at descending then id."""
        check_page(limit, offset)
        args = _filter_args(token_filter, now)
        if args is None:
            return []
        rows = await self._connected.fetch(LIST_TOKENS, *args, limit, offset)
        return [_token(row) for row in rows]

    async def count_tokens(self, token_filter: TokenFilter, *, now: datetime) -> int:
        """How many tokens `list_tokens` would page through."""
        args = _filter_args(token_filter, now)
        if args is None:
            return 0
        return int(await self._connected.fetchval(COUNT_TOKENS, *args))

    async def revoke_token(self, token_id: str) -> bool:
        """Set is_active false; False when the token is unknown (idempotent)."""
        key = _uuid(token_id)
        if key is None:
            return False
        return _affected(await self._connected.execute(REVOKE_TOKEN, key)) > 0

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        """Revoke every token of a project."""
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

    async def record_token_usage(self, usage: Sequence[TokenUsage]) -> None:
        """Add request counts and move last_used_at forward, in one transaction."""
        args = [
            (key, u.requests, u.last_used_at)
            for u in usage
            if (key := _uuid(u.token_id)) is not None
        ]
        if not args:
            return
        async with self._connected.acquire() as con, con.transaction():
            await con.executemany(RECORD_TOKEN_USAGE, args)

    async def change_mark(self) -> int:
        """The snapshot's xmin: every transaction below it has finished."""
        return int(await self._connected.fetchval(CHANGE_MARK))

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
        args = (*_cursor(mark, after), limit, active_only)
        rows = await self._connected.fetch(TOKENS_CHANGED, *args)
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
        args = (*_cursor(mark, after), limit)
        rows = await self._connected.fetch(PROJECTS_CHANGED, *args)
        return ChangePage([_project(row) for row in rows], _next_cursor(rows, limit))

    async def load_deletions_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Deletion]:
        """Tombstones with a marker >= `mark`, in marker order, from `after` on."""
        args = (*_cursor(mark, after), limit)
        rows = await self._connected.fetch(DELETIONS_SINCE, *args)
        deletions = [Deletion(row["kind"], str(row["id"])) for row in rows]
        return ChangePage(deletions, _next_cursor(rows, limit))

    async def purge_deletions(self, *, before: datetime) -> int:
        """Forget tombstones older than `before`; return how many."""
        return _affected(await self._connected.execute(PURGE_DELETIONS, before))

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

    async def count_purgeable(
        self, *, tokens_before: datetime | None, usage_before: datetime | None
    ) -> PurgeCounts:
        """What the purges would delete at these cut-offs (None: that kind is kept)."""
        pool = self._connected
        tokens = usage_events = 0
        if tokens_before is not None:
            tokens = int(await pool.fetchval(COUNT_PURGEABLE_TOKENS, tokens_before))
        if usage_before is not None:
            old = await pool.fetchval(COUNT_OLD_USAGE_EVENTS, usage_before)
            usage_events = int(old)
        return PurgeCounts(tokens=tokens, usage_events=usage_events)

    async def purge_tokens(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` tokens expired or revoked before `before`."""
        return _affected(await self._connected.execute(PURGE_TOKENS, before, limit))

    async def purge_usage_events(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the oldest usage events with ts before `before`."""
        status = await self._connected.execute(PURGE_USAGE_EVENTS, before, limit)
        return _affected(status)

    async def insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert events, skipping event ids already stored; return rows inserted.

        Text is stored cleaned (`storable_usage_event`); rows the database cannot
        take raise `RejectedRowsError` (the whole statement inserts nothing).
        """
        if not events:
            return 0
        pool = self._connected
        try:
            rows = [_usage_args(storable_usage_event(event)) for event in events]
            columns = list(zip(*rows, strict=True))
            status = await pool.execute(INSERT_USAGE_EVENTS, *columns)
        except USAGE_DATA_ERRORS as exc:
            raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc
        return _affected(status)

    async def usage_totals(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> UsageTotals:
        """Totals of events with since <= ts < until, optionally of one project/token."""
        args = _usage_where(since, until, project_id, token_id)
        if args is None:
            return UsageTotals()
        row = await self._connected.fetchrow(USAGE_TOTALS, *args)
        assert row is not None  # an aggregate without GROUP BY: always one row
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
        args = _usage_where(since, until, project_id, token_id)
        if args is None:
            return []
        return _usage_rows(await self._connected.fetch(USAGE_BY_DAY, *args))

    async def usage_by_project(
        self, *, since: datetime, until: datetime, limit: int = 50
    ) -> list[UsageRow]:
        """Totals per project id, busiest first."""
        args = (since, until, None, None, limit)
        return _usage_rows(await self._connected.fetch(USAGE_BY_PROJECT, *args))

    async def usage_by_token(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        limit: int = 50,
    ) -> list[UsageRow]:
        """Totals per token id, busiest first, optionally of one project."""
        args = _usage_where(since, until, project_id, None)
        if args is None:
            return []
        return _usage_rows(await self._connected.fetch(USAGE_BY_TOKEN, *args, limit))

    async def recent_usage_events(
        self, limit: int, *, errors_only: bool = False
    ) -> list[UsageEvent]:
        """The newest events (only status >= 400 when `errors_only`)."""
        rows = await self._connected.fetch(RECENT_USAGE_EVENTS, errors_only, limit)
        return [_usage_event(row) for row in rows]

    @property
    def _connected(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RepositoryError("PostgresRepository is not connected; call connect()")
        return self._pool

    async def _fetch_one(self, sql: str, params: Params = ()) -> asyncpg.Record | None:
        return await self._connected.fetchrow(sql, *params)

    async def _fetch_all(self, sql: str, params: Params = ()) -> list[asyncpg.Record]:
        return await self._connected.fetch(sql, *params)

    async def _scalar(self, sql: str, params: Params = ()) -> Any:
        return await self._connected.fetchval(sql, *params)

    async def _write(self, sql: str, params: Params = ()) -> int:
        return _affected(await self._connected.execute(sql, *params))

    async def _write_many(self, sql: str, rows: Sequence[Params]) -> None:
        async with self._connected.acquire() as con, con.transaction():
            await con.executemany(sql, rows)

    @staticmethod
    def _time(moment: datetime) -> datetime:
        return moment


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
        raise MigrationError(
            f"migration {migration.version:03d}_{migration.name} failed: {exc}"
        ) from exc
    log.info("applied migration %03d_%s", migration.version, migration.name)


def _cursor(mark: int, after: ChangeCursor | None) -> tuple[int, uuid.UUID]:
    if after is None:
        return (mark, START_ID)
    return (after[0], uuid.UUID(after[1]))


def _next_cursor(rows: Sequence[Any], limit: int) -> ChangeCursor | None:
    """Where the next page starts; None when this page was not full (the last)."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    return (int(last["change_seq"]), str(last["id"]))


def _server_settings(schema: str | None) -> dict[str, str] | None:
    if schema is None:
        return None
    return {"search_path": '"' + schema.replace('"', '""') + '"'}


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _affected(status: str) -> int:
    """Row count from a command tag such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


def _raise_if_duplicate_name(exc: Any, name: str | None) -> None:
    if exc.constraint_name == NAME_CONSTRAINT:
        raise DuplicateNameError(f"a project named {name!r} already exists") from exc


def _project_args(project: Project) -> tuple[Any, ...]:
    return (
        project.id,
        project.name,
        project.description,
        dump_metadata(project.metadata),
        project.encrypted_api_key,
        project.api_key_hint,
        project.is_active,
        project.created_at,
        project.updated_at,
        project.max_concurrent,
    )


def _changes_args(changes: ProjectChanges) -> tuple[Any, ...]:
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


def _project(row: Any) -> Project:
    return Project(
        id=str(row["id"]),
        name=row["name"],
        description=row["description"],
        metadata=load_metadata(row["metadata"]),
        encrypted_api_key=row["openai_api_key"],
        api_key_hint=row["api_key_hint"],
        is_active=row["is_active"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        max_concurrent=row["max_concurrent"],
    )


def _token_args(token: Token) -> tuple[Any, ...]:
    return (
        token.id,
        token.token_hash,
        token.token_hint,
        token.project_id,
        token.expires_at,
        token.is_active,
        token.request_count,
        token.max_requests,
        token.rate_limit_per_hour,
        token.created_at,
        token.last_used_at,
        token.max_concurrent,
    )


def _filter_args(token_filter: TokenFilter, now: datetime) -> tuple[Any, ...] | None:
    """Arguments for FILTER_TOKENS; None when the project id cannot match anything."""
    if token_filter.project_id is None:
        return (None, token_filter.active, now)
    key = _uuid(token_filter.project_id)
    return None if key is None else (key, token_filter.active, now)


def _token(row: Any, change_seq: int | None = None) -> Token:
    # By position (TOKEN_COLUMNS order, which every token query selects first): a
    # reload converts up to a page of rows per loop slice, and names cost twice as much.
    return Token(
        id=str(row[0]),
        token_hash=row[1],
        token_hint=row[2],
        project_id=str(row[3]),
        expires_at=row[4],
        is_active=row[5],
        request_count=row[6],
        max_requests=row[7],
        rate_limit_per_hour=row[8],
        created_at=row[9],
        last_used_at=row[10],
        max_concurrent=row[11],
        change_seq=change_seq,
    )


def _optional_uuid(text: str | None) -> uuid.UUID | None:
    return None if text is None else _uuid(text)


def _usage_args(event: UsageEvent) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.ts,
        _optional_uuid(event.project_id),
        _optional_uuid(event.token_id),
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
) -> tuple[Any, ...] | None:
    """Arguments for USAGE_WHERE; None when an id cannot match anything."""
    project_key, token_key = _optional_uuid(project_id), _optional_uuid(token_id)
    if (project_key is None) != (project_id is None):
        return None
    if (token_key is None) != (token_id is None):
        return None
    return (since, until, project_key, token_key)


def _usage_totals(sums: Sequence[Any]) -> UsageTotals:
    return UsageTotals(*(int(value) for value in sums))


def _usage_rows(rows: Sequence[Any]) -> list[UsageRow]:
    return [UsageRow(str(row[0]), _usage_totals(tuple(row)[1:])) for row in rows]


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _usage_event(row: Any) -> UsageEvent:
    return UsageEvent(
        event_id=row["event_id"],
        ts=row["ts"],
        project_id=_optional_text(row["project_id"]),
        token_id=_optional_text(row["token_id"]),
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
