"""`AuditBackend`: the `AuditStore` methods of both backends, written once.

The statements are PostgreSQL text that each backend's `Dialect` renders
(`audit_statements`); the methods run on `SqlBackend`'s driver calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any, ClassVar, Final

from ._common import check_page, clean_text, dump_metadata, load_metadata
from .audit import AuditEvent, AuditFilter
from .backend import Params, SqlBackend
from .base import RejectedRowsError
from .statements import Dialect

COLUMNS: Final = tuple(field.name for field in fields(AuditEvent))
_TEXT: Final = COLUMNS[2:-1]  # action ... reason
# $1 action, $2 actor, $3 project id, $4 token id, $5 outcome, $6 since, $7 until;
# each NULL matches any.
_WHERE: Final = (
    "($1::text IS NULL OR action = $1) AND ($2::text IS NULL OR actor = $2)"
    " AND ($3::text IS NULL OR project_id = $3) AND ($4::text IS NULL OR token_id = $4)"
    " AND ($5::text IS NULL OR outcome = $5)"
    " AND ($6::timestamptz IS NULL OR ts >= $6) AND ($7::timestamptz IS NULL OR ts < $7)"
)
_SELECT: Final = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
TEMPLATES: Final = {
    "insert": (
        f"INSERT INTO audit_events ({', '.join(COLUMNS)})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)"
        " ON CONFLICT (id) DO NOTHING"
    ),
    "list": f"{_SELECT} WHERE {_WHERE} ORDER BY ts DESC, id DESC LIMIT $8 OFFSET $9",
    "count": f"SELECT count(*) FROM audit_events WHERE {_WHERE}",
    "get": f"{_SELECT} WHERE id = $1",
    "count_old": "SELECT count(*) FROM audit_events WHERE ts < $1",
    # Oldest first, one short statement per batch.
    "purge": (
        "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events"
        " WHERE ts < $1 ORDER BY ts LIMIT $2)"
    ),
}


def audit_statements(dialect: Dialect) -> dict[str, str]:
    """The audit statements in `dialect`."""
    return {name: dialect.render(text) for name, text in TEMPLATES.items()}


class AuditBackend(SqlBackend):
    """`SqlBackend` with the audit trail's table; each backend sets `_audit_sql`."""

    _audit_sql: ClassVar[dict[str, str]]

    async def insert_audit_events(self, events: Sequence[AuditEvent]) -> None:
        """Insert rows in one transaction, skipping ids already stored."""
        if not events:
            return
        rows = [self._audit_params(event) for event in events]
        try:
            await self._write_many(self._audit_sql["insert"], rows)
        except self._usage_data_errors as exc:  # the driver's errors of bad rows
            raise RejectedRowsError(f"{type(exc).__name__}: {exc}") from exc

    async def list_audit_events(
        self, audit_filter: AuditFilter, *, limit: int, offset: int
    ) -> list[AuditEvent]:
        """A page of matching rows, newest first."""
        check_page(limit, offset)
        params = (*self._audit_filter_params(audit_filter), limit, offset)
        rows = await self._fetch_all(self._audit_sql["list"], params)
        return [audit_event(row) for row in rows]

    async def count_audit_events(self, audit_filter: AuditFilter) -> int:
        """How many rows match."""
        params = self._audit_filter_params(audit_filter)
        return int(await self._scalar(self._audit_sql["count"], params))

    async def get_audit_event(self, event_id: str) -> AuditEvent | None:
        """One row by its id."""
        row = await self._fetch_one(self._audit_sql["get"], (event_id,))
        return None if row is None else audit_event(row)

    async def count_old_audit_events(self, *, before: datetime) -> int:
        """Rows with ts before `before`."""
        sql = self._audit_sql["count_old"]
        return int(await self._scalar(sql, (self._time(before),)))

    async def purge_audit_events(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the oldest rows with ts before `before`."""
        return await self._write(self._audit_sql["purge"], (self._time(before), limit))

    def _audit_filter_params(self, audit_filter: AuditFilter) -> Params:
        since, until = audit_filter.since, audit_filter.until
        return (
            audit_filter.action,
            audit_filter.actor,
            audit_filter.project_id,
            audit_filter.token_id,
            audit_filter.outcome,
            None if since is None else self._time(since),
            None if until is None else self._time(until),
        )

    def _audit_params(self, event: AuditEvent) -> Params:
        texts = [getattr(event, name) for name in _TEXT]
        return (
            clean_text(event.id),
            self._time(event.ts),
            *(None if text is None else clean_text(text) for text in texts),
            dump_metadata(event.metadata),
        )


def audit_event(row: Any) -> AuditEvent:
    """A stored row as a record (times come as text from SQLite)."""
    ts = row["ts"]
    return AuditEvent(
        id=row["id"],
        ts=ts if isinstance(ts, datetime) else datetime.fromisoformat(ts),
        **{name: row[name] for name in _TEXT},
        metadata=load_metadata(row["metadata"]),
    )
