"""Batched row inserts into the proxy's own database, refused rows set aside.

Shared by the usage and audit recorders: each event becomes a row; a batch the
database refuses for its data is split in halves until the refused rows stand alone
(O(log n) inserts each); any other error retries the rows not yet written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ..events.model import EventT
from ..storage import RejectedRowsError
from .base import SendResult

RowT = TypeVar("RowT")


async def insert_rows(
    batch: Sequence[EventT],
    to_row: Callable[[EventT], RowT],
    insert: Callable[[list[RowT]], Awaitable[object]],
    kind: str,
) -> SendResult[EventT]:
    """Insert the rows of `batch`; what was refused or must be retried, per event."""
    result = SendResult[EventT]()
    rows: list[tuple[EventT, RowT]] = []
    for event in batch:
        try:
            rows.append((event, to_row(event)))
        except (TypeError, ValueError, OverflowError) as exc:  # a foreign event
            result.rejected.append((event, f"not {kind} row: {exc!r:.200}"))
    parts = [rows] if rows else []
    while parts:  # depth first, so refused rows are isolated in O(log n) inserts
        part = parts.pop()
        try:
            await insert([row for _, row in part])
        except RejectedRowsError as exc:
            if len(part) > 1:
                middle = len(part) // 2
                parts += [part[middle:], part[:middle]]
                continue
            result.rejected.append((part[0][0], f"refused by the database: {exc}"))
        except Exception as exc:  # driver errors differ per database: transient
            result.retry = [event for rest in (part, *parts) for event, _ in rest]
            result.retry_reason = f"{type(exc).__name__}: {exc}"
            break
    return result
