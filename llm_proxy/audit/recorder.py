"""The audit recorder: records from the audit bus become `audit_events` rows.

Batches are written through `Repository.insert_audit_events`, which skips ids already
stored, so a batch the Redis bus delivers again is not written twice. A lost
connection or a busy database retries the batch (the dispatcher's backoff, then its
dead-letter file: counted and logged, never dropped silently); a batch the database
refuses for its data is split until the refused rows stand alone (`dispatchers.rows`),
so only those are set aside.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ..clock import iso_epoch_s
from ..dispatchers.base import SendResult
from ..dispatchers.rows import insert_rows
from ..events.audit import AuditRecorded
from ..storage import AuditEvent
from ..storage.audit import AuditStore


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
        return await insert_rows(
            batch, audit_row, self.store.insert_audit_events, "an audit"
        )

    async def close(self) -> None:
        """Nothing of its own to close."""
