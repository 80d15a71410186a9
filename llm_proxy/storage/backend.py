"""`SqlBackend`: the `Repository` methods both databases share, written once.

A backend supplies its driver calls (`_fetch_one`, `_write`, ...), how it passes ids
and times, how its rows become records, and the methods whose SQL is its own. What
each method does is documented once, on the `Repository` protocol in `base.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ._common import (
    check_page,
    dump_metadata,
    dump_origins,
    dump_policy,
    like_pattern,
    storable_usage_event,
)
from .base import (
    ChangePage,
    Deletion,
    DuplicateNameError,
    PurgeCounts,
    RejectedRowsError,
    RepositoryError,
    UsageRow,
    UsageTotals,
)
from .statements import CHANGE_SEQ, Statements

if TYPE_CHECKING:  # only annotations name these
    from .base import (
        ChangeCursor,
        Project,
        ProjectChanges,
        Token,
        TokenFilter,
        TokenUsage,
        UsageEvent,
    )

Params = Sequence[Any]
R = TypeVar("R")
Row = Any  # a driver row: sqlite3.Row or asyncpg.Record, read by position or name


class SqlBackend(ABC):
    """The shared half of `SqliteRepository` and `PostgresRepository`."""

    _sql: ClassVar[Statements]  # the shared statements in the backend's dialect
    _integrity_error: ClassVar[type[Exception]]  # what a broken constraint raises
    _usage_data_errors: ClassVar[tuple[type[Exception], ...]]  # rows at fault

    # -- what each backend supplies --------------------------------------------------

    @abstractmethod
    async def _fetch_one(self, sql: str, params: Params = ()) -> Row | None: ...

    @abstractmethod
    async def _fetch_all(self, sql: str, params: Params = ()) -> Sequence[Row]: ...

    @abstractmethod
    async def _scalar(self, sql: str, params: Params = ()) -> Any: ...

    @abstractmethod
    async def _write(self, sql: str, params: Params = ()) -> int:
        """Run one changing statement; return how many rows it changed."""

    @abstractmethod
    async def _write_returning(self, sql: str, params: Params) -> Row | None:
        """Run one changing statement; return the first row it returns."""

    @abstractmethod
    async def _write_many(self, sql: str, rows: Sequence[Params]) -> None:
        """Run one statement per parameter row, in one transaction."""

    @abstractmethod
    async def _insert_usage(self, events: Sequence[UsageEvent]) -> int:
        """Insert storable events, skipping stored event ids; return rows inserted."""

    @staticmethod
    @abstractmethod
    def _key(text: str) -> Any:
        """An id as the database compares it; None when no row can have it."""

    @staticmethod
    @abstractmethod
    def _time(moment: datetime) -> Any:
        """A time as the database stores it."""

    @staticmethod
    @abstractmethod
    def _cursor(mark: int, after: ChangeCursor | None) -> Params:
        """The keyset parameters ($1, $2) of a page of changes."""

    @staticmethod
    @abstractmethod
    def _project(row: Row) -> Project: ...

    @staticmethod
    @abstractmethod
    def _token(row: Row, change_seq: int | None = None) -> Token: ...

    @staticmethod
    @abstractmethod
    def _usage_event(row: Row) -> UsageEvent: ...

    @staticmethod
    @abstractmethod
    def _token_usage(usage: Sequence[TokenUsage]) -> list[Params]:
        """Parameter rows ($1 id, $2 requests, $3 last used) of `record_token_usage`."""

    @staticmethod
    @abstractmethod
    def _is_duplicate_name(exc: Exception) -> bool: ...

    @staticmethod
    @abstractmethod
    def _is_unknown_project(exc: Exception) -> bool: ...

    # -- the Repository methods ------------------------------------------------------

    async def ping(self) -> None:
        await self._scalar(self._sql.ping)

    async def get_meta(self, key: str) -> str | None:
        value = await self._scalar(self._sql.select_meta, (key,))
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        await self._write(self._sql.upsert_meta, (key, value))

    async def create_project(self, project: Project) -> None:
        try:
            await self._write(self._sql.insert_project, self._project_params(project))
        except self._integrity_error as exc:
            self._raise_if_duplicate_name(exc, project.name)
            raise

    async def get_project(self, project_id: str) -> Project | None:
        return await self._by_id(self._sql.select_project, project_id, self._project)

    async def list_projects(
        self, *, limit: int, offset: int, search: str | None = None
    ) -> list[Project]:
        check_page(limit, offset)
        params = (like_pattern(search), limit, offset)
        rows = await self._fetch_all(self._sql.list_projects, params)
        return [self._project(row) for row in rows]

    async def count_projects(self, *, search: str | None = None) -> int:
        params = (like_pattern(search),)
        return int(await self._scalar(self._sql.count_projects, params))

    async def update_project(
        self, project_id: str, changes: ProjectChanges, *, now: datetime
    ) -> Project | None:
        key = self._key(project_id)
        if key is None:
            return None
        params = (key, *_changes_params(changes), self._time(now))
        try:
            row = await self._write_returning(self._sql.update_project, params)
        except self._integrity_error as exc:
            self._raise_if_duplicate_name(exc, changes.name)
            raise
        return None if row is None else self._project(row)

    async def delete_project(self, project_id: str) -> bool:
        return await self._write_by_id(self._sql.delete_project, project_id) > 0

    async def create_token(self, token: Token) -> None:
        try:
            await self._write(self._sql.insert_token, self._token_params(token))
        except self._integrity_error as exc:
            if self._is_unknown_project(exc):
                raise RepositoryError(f"unknown project {token.project_id}") from exc
            raise

    async def get_token(self, token_id: str) -> Token | None:
        return await self._by_id(self._sql.select_token, token_id, self._token)

    async def get_token_by_hash(self, token_hash: str) -> Token | None:
        row = await self._fetch_one(self._sql.select_token_by_hash, (token_hash,))
        return None if row is None else self._token(row)

    async def list_tokens(
        self, token_filter: TokenFilter, *, now: datetime, limit: int, offset: int
    ) -> list[Token]:
        check_page(limit, offset)
        params = self._filter_params(token_filter, now)
        if params is None:
            return []
        rows = await self._fetch_all(self._sql.list_tokens, (*params, limit, offset))
        return [self._token(row) for row in rows]

    async def count_tokens(self, token_filter: TokenFilter, *, now: datetime) -> int:
        params = self._filter_params(token_filter, now)
        if params is None:
            return 0
        return int(await self._scalar(self._sql.count_tokens, params))

    async def revoke_token(self, token_id: str) -> bool:
        return await self._write_by_id(self._sql.revoke_token, token_id) > 0

    async def record_token_usage(self, usage: Sequence[TokenUsage]) -> None:
        rows = self._token_usage(usage)
        if rows:
            await self._write_many(self._sql.record_token_usage, rows)

    async def load_tokens_changed_since(
        self,
        mark: int,
        *,
        after: ChangeCursor | None = None,
        limit: int,
        active_only: bool = False,
        unchanged: Callable[[str, int], bool] | None = None,
    ) -> ChangePage[Token]:
        params = (*self._cursor(mark, after), limit, active_only)
        rows = await self._fetch_all(self._sql.tokens_changed, params)
        token = self._token
        if unchanged is None:
            tokens = [token(row, row[CHANGE_SEQ]) for row in rows]
        else:
            tokens = [
                token(row, row[CHANGE_SEQ])
                for row in rows
                if not unchanged(row[1], row[CHANGE_SEQ])  # token hash, marker
            ]
        return ChangePage(tokens, _next_cursor(rows, limit))

    async def load_projects_changed_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Project]:
        sql = self._sql.projects_changed
        return await self._changes(sql, mark, after, limit, self._project)

    async def load_deletions_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Deletion]:
        sql = self._sql.deletions_since
        return await self._changes(sql, mark, after, limit, _deletion)

    async def purge_deletions(self, *, before: datetime) -> int:
        return await self._write(self._sql.purge_deletions, (self._time(before),))

    async def count_purgeable(
        self, *, tokens_before: datetime | None, usage_before: datetime | None
    ) -> PurgeCounts:
        tokens = usage_events = 0
        if tokens_before is not None:
            params = (self._time(tokens_before),)
            tokens = int(await self._scalar(self._sql.count_purgeable_tokens, params))
        if usage_before is not None:
            params = (self._time(usage_before),)
            old = await self._scalar(self._sql.count_old_usage_events, params)
            usage_events = int(old)
        return PurgeCounts(tokens=tokens, usage_events=usage_events)

    async def insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        if not events:
            return 0
        try:
            return await self._insert_usage([storable_usage_event(e) for e in events])
        except self._usage_data_errors as exc:
            raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc

    async def usage_totals(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> UsageTotals:
        params = self._usage_where(since, until, project_id, token_id)
        if params is None:
            return UsageTotals()
        row = await self._fetch_one(self._sql.usage_totals, params)
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
        params = self._usage_where(since, until, project_id, token_id)
        if params is None:
            return []
        return _usage_rows(await self._fetch_all(self._sql.usage_by_day, params))

    async def usage_by_project(
        self, *, since: datetime, until: datetime, limit: int = 50
    ) -> list[UsageRow]:
        params = (self._time(since), self._time(until), None, None, limit)
        return _usage_rows(await self._fetch_all(self._sql.usage_by_project, params))

    async def usage_by_token(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        limit: int = 50,
    ) -> list[UsageRow]:
        params = self._usage_where(since, until, project_id, None)
        if params is None:
            return []
        rows = await self._fetch_all(self._sql.usage_by_token, (*params, limit))
        return _usage_rows(rows)

    async def recent_usage_events(
        self, limit: int, *, errors_only: bool = False
    ) -> list[UsageEvent]:
        params = (errors_only, limit)
        rows = await self._fetch_all(self._sql.recent_usage_events, params)
        return [self._usage_event(row) for row in rows]

    # -- helpers ---------------------------------------------------------------------

    async def _by_id(
        self, sql: str, row_id: str, record: Callable[[Row], R]
    ) -> R | None:
        """The record of the row `sql` selects by id; None when there is none."""
        key = self._key(row_id)
        row = None if key is None else await self._fetch_one(sql, (key,))
        return None if row is None else record(row)

    async def _write_by_id(self, sql: str, row_id: str) -> int:
        """Run `sql` on the row with this id; return how many rows it changed."""
        key = self._key(row_id)
        return 0 if key is None else await self._write(sql, (key,))

    async def _changes(
        self,
        sql: str,
        mark: int,
        after: ChangeCursor | None,
        limit: int,
        record: Callable[[Row], R],
    ) -> ChangePage[R]:
        """One page of the changed rows `sql` selects, as records."""
        rows = await self._fetch_all(sql, (*self._cursor(mark, after), limit))
        return ChangePage([record(row) for row in rows], _next_cursor(rows, limit))

    def _not_connected(self) -> RepositoryError:
        return RepositoryError(
            f"{type(self).__name__} is not connected; call connect()"
        )

    def _raise_if_duplicate_name(self, exc: Exception, name: str | None) -> None:
        if self._is_duplicate_name(exc):
            raise DuplicateNameError(
                f"a project named {name!r} already exists"
            ) from exc

    def _project_params(self, project: Project) -> Params:
        return (
            project.id,
            project.name,
            project.description,
            dump_metadata(project.metadata),
            project.encrypted_api_key,
            project.api_key_hint,
            project.is_active,
            self._time(project.created_at),
            self._time(project.updated_at),
            project.max_concurrent,
            project.cache_ttl_seconds,
            dump_origins(project.allowed_origins),
            project.require_origin,
            dump_policy(project.policy),
        )

    def _token_params(self, token: Token) -> Params:
        last_used_at = token.last_used_at
        return (
            token.id,
            token.token_hash,
            token.token_hint,
            token.project_id,
            self._time(token.expires_at),
            token.is_active,
            token.request_count,
            token.max_requests,
            token.rate_limit_per_hour,
            self._time(token.created_at),
            None if last_used_at is None else self._time(last_used_at),
            token.max_concurrent,
            dump_policy(token.policy),
        )

    def _filter_params(self, token_filter: TokenFilter, now: datetime) -> Params | None:
        """Parameters of filter_tokens; None when the project id matches nothing."""
        project_id = token_filter.project_id
        key = None if project_id is None else self._key(project_id)
        if key is None and project_id is not None:
            return None
        return (key, token_filter.active, self._time(now))

    def _usage_where(
        self,
        since: datetime,
        until: datetime,
        project_id: str | None,
        token_id: str | None,
    ) -> Params | None:
        """Parameters of usage_where; None when an id matches nothing."""
        project_key = None if project_id is None else self._key(project_id)
        token_key = None if token_id is None else self._key(token_id)
        if (project_key is None) != (project_id is None):
            return None
        if (token_key is None) != (token_id is None):
            return None
        return (self._time(since), self._time(until), project_key, token_key)


def _changes_params(changes: ProjectChanges) -> Params:
    """Parameters $2 to $15 of update_project."""
    metadata, origins = changes.metadata, changes.allowed_origins
    return (
        changes.name,
        changes.description,
        None if metadata is None else dump_metadata(metadata),
        changes.encrypted_api_key,
        changes.api_key_hint,
        changes.is_active,
        changes.clear_max_concurrent,
        changes.max_concurrent,
        changes.clear_cache_ttl_seconds,
        changes.cache_ttl_seconds,
        None if origins is None else dump_origins(origins),
        changes.require_origin,
        changes.clear_policy,
        dump_policy(changes.policy),
    )


def _deletion(row: Row) -> Deletion:
    return Deletion(row[0], str(row[1]))  # kind, id (a UUID in PostgreSQL)


def _next_cursor(rows: Sequence[Row], limit: int) -> ChangeCursor | None:
    """Where the next page starts; None when this page was not full (the last)."""
    if len(rows) < limit or not rows:
        return None
    last = rows[-1]
    return (int(last["change_seq"]), str(last["id"]))


def _usage_totals(sums: Sequence[Any]) -> UsageTotals:
    return UsageTotals(*(int(value) for value in sums))


def _usage_rows(rows: Sequence[Row]) -> list[UsageRow]:
    return [UsageRow(str(row[0]), _usage_totals(tuple(row)[1:])) for row in rows]
