"""Audit records in storage: the row, the filter of a listing, and the methods every
backend adds for them (`AuditStore`, part of the `Repository` protocol).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One row of `audit_events`: an action, who did it, to what, and how it ended."""

    id: str
    ts: datetime
    action: str
    actor: str
    outcome: str
    client_ip: str | None = None
    request_id: str | None = None
    project_id: str | None = None
    token_id: str | None = None
    reason: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which audit rows a listing returns; None matches any. `since <= ts < until`."""

    action: str | None = None
    actor: str | None = None
    project_id: str | None = None
    token_id: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class AuditStore(Protocol):
    """The audit trail's table."""

    async def insert_audit_events(self, events: Sequence[AuditEvent]) -> None:
        """Insert rows in one transaction, skipping ids already stored.

        Rows the database cannot take raise `RejectedRowsError` (nothing inserted).
        """

    async def list_audit_events(
        self, audit_filter: AuditFilter, *, limit: int, offset: int
    ) -> list[AuditEvent]:
        """A page of matching rows, newest first."""

    async def count_audit_events(self, audit_filter: AuditFilter) -> int:
        """How many rows match."""

    async def get_audit_event(self, event_id: str) -> AuditEvent | None:
        """One row by its id."""

    async def count_old_audit_events(self, *, before: datetime) -> int:
        """Rows with ts before `before` (what a purge would delete)."""

    async def purge_audit_events(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` of the oldest rows with ts before `before`, in one
        short transaction; return how many."""
