"""`GET /manage/audit` and `GET /manage/audit/{event_id}`: the audit trail, read.

Filters `action`, `actor`, `project_id`, `token_id`, `outcome`, `start_time` and
`end_time` (ISO 8601; a time without a zone is UTC; `start_time <= t < end_time`);
pages `page` (from 1) of `page_size` (1-100, default 20), newest first. The filter and
paging rules are shared with the admin audit page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from ..audit.trail import OUTCOMES
from ..clock import utc_iso
from ..keys import REPOSITORY_KEY
from ..storage import AuditEvent, AuditFilter
from .service import NotFound, ServiceError

DEFAULT_PAGE_SIZE: Final = 20
MAX_PAGE_SIZE: Final = 100
MAX_PAGE: Final = 1_000_000
TEXT_FILTERS: Final = ("action", "actor", "project_id", "token_id")
MAX_FILTER_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A listing asked for: its filter and which page."""

    audit_filter: AuditFilter
    page: int = 1
    page_size: int = DEFAULT_PAGE_SIZE

    @property
    def offset(self) -> int:
        """Rows before this page."""
        return (self.page - 1) * self.page_size


def audit_query(query: Mapping[str, str]) -> AuditQuery:
    """The filter and page of query parameters; `ServiceError` naming a bad one."""
    texts = {name: _text(query, name) for name in TEXT_FILTERS}
    outcome = _text(query, "outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ServiceError(
            f"outcome must be one of {', '.join(OUTCOMES)}.", param="outcome"
        )
    audit_filter = AuditFilter(
        **texts,
        outcome=outcome,
        since=_time(query, "start_time"),
        until=_time(query, "end_time"),
    )
    return AuditQuery(
        audit_filter,
        page=_integer(query, "page", 1, MAX_PAGE),
        page_size=_integer(query, "page_size", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
    )


def _text(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name, "").strip()
    if "\x00" in value or len(value) > MAX_FILTER_CHARS:
        raise ServiceError(
            f"{name} must be at most {MAX_FILTER_CHARS} characters, without NUL.",
            param=name,
        )
    return value or None


def _integer(query: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = query.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise ServiceError(
            f"{name} must be a whole number from 1 to {high}.", param=name
        )
    return int(raw)


def _time(query: Mapping[str, str], name: str) -> datetime | None:
    raw = query.get(name, "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ServiceError(
            f"{name} must be an ISO 8601 time, like 2025-01-31T12:00:00Z.", param=name
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def audit_event_json(event: AuditEvent) -> dict[str, Any]:
    """One audit row as the API shows it."""
    return {
        "id": event.id,
        "timestamp": utc_iso(event.ts, "milliseconds"),
        "action": event.action,
        "actor": event.actor,
        "outcome": event.outcome,
        "client_ip": event.client_ip,
        "request_id": event.request_id,
        "project_id": event.project_id,
        "token_id": event.token_id,
        "reason": event.reason,
        "metadata": dict(event.metadata),
    }


def pagination(query: AuditQuery, total: int) -> dict[str, Any]:
    """Where a page sits in the whole listing."""
    pages = -(-total // query.page_size)
    return {
        "page": query.page,
        "page_size": query.page_size,
        "total_count": total,
        "total_pages": pages,
        "has_next": query.page < pages,
        "has_prev": query.page > 1,
    }


async def list_audit_handler(request: web.Request) -> web.Response:
    """GET /manage/audit: a page of audit events and where it sits."""
    query = audit_query(request.query)
    repository = request.config_dict[REPOSITORY_KEY]
    events = await repository.list_audit_events(
        query.audit_filter, limit=query.page_size, offset=query.offset
    )
    total = await repository.count_audit_events(query.audit_filter)
    body = {
        "events": [audit_event_json(event) for event in events],
        "pagination": pagination(query, total),
    }
    return _json(body)


async def get_audit_handler(request: web.Request) -> web.Response:
    """GET /manage/audit/{event_id}: one audit event."""
    event_id = request.match_info["event_id"]
    event = await request.config_dict[REPOSITORY_KEY].get_audit_event(event_id)
    if event is None:
        raise NotFound(f"No audit event with id {event_id!r}.", param="event_id")
    return _json(audit_event_json(event))


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")
