"""The audit recorder: records from the audit bus become `audit_events` rows.

Batches are written through `Repository.insert_audit_events`, which skips ids already
stored, so a batch the Redis bus delivers again is not written twice. A lost
connection or a busy database retries the batch (the dispatcher's backoff, then its
dead-letter file: counted and logged, never dropped silently); a batch the database
refuses for its data is written row by row, so only the refused rows are set aside.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ..clock import iso_epoch_s
from ..dispatchers.base import SendResult
from ..events.audit import AuditRecorded
from ..storage import AuditEvent, RejectedRowsError
from ..storage.audit import AuditStore

Row = tuple[AuditRecorded, AuditEvent]


def audit_row(event: AuditRecorded) -> AuditEvent:
    """The `audit_events` row of one record."""
    return AuditEvent(
        id=event.event_id,
        ts=datetime.fromtimestamp(iso_epoch_s(event.timestamp), UTC),
        action=event.action,
        actor=event.actor,
        outcome=event.outcome,
        client_ip=event.client_ip,
        request_id=event.request_id,
        project_id=event.project_id,
        token_id=event.token_id,
        reason=event.reason,
        metadata=dict(event.metadata),
    )


class AuditRecorder:
    """Batched inserts of audit records into the proxy's own database."""

    name = "audit"

    def __init__(self, store: AuditStore) -> None:
        self.store = store

    async def start(self) -> None:
        """The repository is opened and closed by the app."""

    async def send(self, batch: Sequence[AuditRecorded]) -> SendResult[AuditRecorded]:
        result = SendResult[AuditRecorded]()
        rows: list[Row] = []
        for event in batch:
            try:
                rows.append((event, audit_row(event)))
            except (TypeError, ValueError, OverflowError) as exc:  # a foreign record
                result.rejected.append((event, f"not an audit row: {exc!r:.200}"))
        if not rows:
            return result
        try:
            await self.store.insert_audit_events([row for _, row in rows])
        except RejectedRowsError:
            await self._row_by_row(rows, result)
        except Exception as exc:  # driver errors differ per database: transient
            _retry(result, rows, exc)
        return result

    async def _row_by_row(
        self, rows: list[Row], result: SendResult[AuditRecorded]
    ) -> None:
        for index, (event, row) in enumerate(rows):
            try:
                await self.store.insert_audit_events([row])
            except RejectedRowsError as exc:
                result.rejected.append((event, f"refused by the database: {exc}"))
            except Exception as exc:
                _retry(result, rows[index:], exc)
                return

    async def close(self) -> None:
        """Nothing of its own to close."""


def _retry(result: SendResult[AuditRecorded], rows: list[Row], exc: Exception) -> None:
    result.retry = [event for event, _ in rows]
    result.retry_reason = f"{type(exc).__name__}: {exc}"
