"""The usage recorder: events become `usage_events` rows for the admin pages.

It writes through `Repository.insert_usage_events`, which skips event ids already
stored, so a batch redelivered by the Redis bus is not counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ..events import Event
from ..repository import Repository, UsageEvent
from .base import DeliveryError, SendResult
from .records import event_time_s, event_usage, extra_field


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
        rows = [usage_row(event) for event in batch]
        try:
            await self.repository.insert_usage_events(rows)
        except Exception as exc:  # driver errors differ per database; all transient
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        return SendResult()

    async def close(self) -> None:
        """Nothing of its own to close."""
