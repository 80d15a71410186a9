"""The audit page: the audit trail, filtered and paged; and which admin actions are
audited as what (the audit middleware of `app.py` reads `AUDITED`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from ..audit import trail as audit
from ..audit.trail import ACTIONS, OUTCOMES
from ..errors import http_status
from ..management.audit_api import audit_query
from ..management.service import ServiceError
from ..storage import AuditEvent
from . import projects, tokens
from .forms import PAGE_SIZE, Pager, page_number
from .render import render, repository

FILTERS: Final = (
    "action",
    "actor",
    "outcome",
    "project_id",
    "token_id",
    "start_time",
    "end_time",
)
AUDITED: Final[Mapping[Any, str]] = {
    projects.create_project_action: audit.PROJECT_CREATE,
    projects.edit_project_action: audit.PROJECT_UPDATE,
    projects.rotate_key_action: audit.PROJECT_ROTATE_KEY,
    projects.origins_action: audit.PROJECT_UPDATE,
    projects.cache_action: audit.PROJECT_UPDATE,
    projects.activation_action: audit.PROJECT_ACTIVATE,
    projects.delete_project_action: audit.PROJECT_DELETE,
    projects.revoke_all_action: audit.PROJECT_REVOKE_TOKENS,
    tokens.create_token_action: audit.TOKEN_CREATE,
    tokens.revoke_token_action: audit.TOKEN_REVOKE,
}


async def audit_page(request: web.Request) -> web.Response:
    """Audit events, newest first, with the API's filters."""
    params = {name: request.query.get(name, "").strip() for name in FILTERS}
    page = page_number(request.query)
    try:
        query = audit_query({**params, "page": str(page), "page_size": str(PAGE_SIZE)})
    except ServiceError as exc:
        return _render(request, params, [], Pager(1, 0), exc)
    repo = repository(request)
    events = await repo.list_audit_events(
        query.audit_filter, limit=query.page_size, offset=query.offset
    )
    total = await repo.count_audit_events(query.audit_filter)
    return _render(request, params, events, Pager(page, total), None)


def _render(
    request: web.Request,
    params: dict[str, str],
    events: list[AuditEvent],
    pager: Pager,
    error: ServiceError | None,
) -> web.Response:
    context = {
        "events": events,
        "pager": pager,
        "params": params,
        "actions": ACTIONS,
        "outcomes": OUTCOMES,
        "error": error,
    }
    status = 200 if error is None else http_status(error)
    return render(request, "audit.html", context, status=status)


def add_routes(app: web.Application) -> None:
    """Register the audit page."""
    app.router.add_get("/audit", audit_page)
