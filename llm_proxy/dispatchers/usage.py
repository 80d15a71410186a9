"""The usage recorder: events become `usage_events` rows for the admin pages.

It writes through `Repository.insert_usage_events`, which skips event ids already
stored, so a batch redelivered by the Redis bus is not counted twice. When the
database refuses a batch for its data (`RejectedRowsError`), the batch is bisected
until the refused rows stand alone: the good rows land, only the bad ones are
dead-lettered. Any other error (a lost connection) retries what is not written yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ..events.model import Event
from ..storage import Repository, UsageEvent
from .base import SendResult
from .records import event_time_s, event_usage, extra_field
from .rows import insert_rows


def usage_row(event: Event) -> UsageEvent:
    """The `usage_events` row of one event."""
    usage = event_usage(event)
    source = extra_field(event, "usage_source")
    return UsageEvent(
        event_id=event.event_id,
        ts=datetime.fromtimestamp(event_time_s(event), UTC),
        project_id=event.project_id,
        token_id=event.token_id,
        endpoint=event.endpoint,
        method=event.method,
        status_code=event.status_code,
        duration_ms=event.duration_ms,
        model=event.model,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
        usage_source=str(source) if source else None,
    )


class UsageRecorder:
    """Batched inserts into the proxy's own database."""

    name = "usage"

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def start(self) -> None:
        """The repository is opened and closed by the app."""

    async def send(self, batch: Sequence[Event]) -> SendResult:
        return await insert_rows(
            batch, usage_row, self.repository.insert_usage_events, "a usage"
        )

    async def close(self) -> None:
        """Nothing of its own to close."""
