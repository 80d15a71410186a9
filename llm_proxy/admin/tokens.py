"""Token pages: list with filters, generate (then the page that shows the value once),
detail and revoke. Writes go through `ManagementService`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from aiohttp import web
from yarl import URL

from ..audit import trail as audit
from ..auth.crypto import TOKEN_PREFIX
from ..auth.policy import binding_header
from ..errors import http_status
from ..management.service import Forbidden, NewToken, NotFound, ServiceError
from ..storage import Project, TokenFilter, TokenPolicy
from .flash import MintedValue
from .forms import PAGE_SIZE, Pager, optional_int, page_number, required_int, text
from .render import (
    proxy_base_url,
    render,
    render_confirm,
    repository,
    see_other,
    service,
    state,
)

STATUS_FILTERS: Final[dict[str, bool | None]] = {
    "": None,
    "active": True,
    "inactive": False,
}
DURATIONS: Final = (
    (15, "15 minutes"),
    (60, "1 hour"),
    (240, "4 hours"),
    (1440, "1 day"),
    (10080, "7 days"),
    (43200, "30 days"),
)
DEFAULT_DURATION: Final = 60
ALL_PROJECTS: Final = 1000
USAGE_DAYS: Final = 7
SHOW_PARAM: Final = "show"  # the slot id of the value, never the value itself
POLICY_INPUTS: Final = (
    "bind",
    "allowed_models",
    "max_output_tokens_cap",
    "no_streaming",
)


def token_url(token_id: str) -> str:
    """The detail page of a token."""
    return f"/admin/tokens/{token_id}"


def created_url(token_id: str) -> str:
    """The page that shows a new token's value (once, given the right slot id)."""
    return f"{token_url(token_id)}/created"


async def _projects(request: web.Request) -> list[Project]:
    found = await service(request).list_projects(limit=ALL_PROJECTS, offset=0)
    return found.items


async def tokens_page(request: web.Request) -> web.Response:
    """The token list, filtered by project and status, newest first."""
    project_id = request.query.get("project_id", "")
    status = request.query.get("status", "")
    status = status if status in STATUS_FILTERS else ""
    page = page_number(request.query)
    token_filter = TokenFilter(project_id or None, STATUS_FILTERS[status])
    found = await service(request).list_tokens(
        token_filter, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
    )
    projects = await _projects(request)
    context = {
        "tokens": found.items,
        "pager": Pager(page, found.total),
        "projects": projects,
        "names": {project.id: project.name for project in projects},
        "project_id": project_id,
        "status": status,
        "params": {"project_id": project_id, "status": status},
    }
    return render(request, "tokens.html", context)


async def new_token_page(request: web.Request) -> web.Response:
    """The generate-token form; `?project_id=` preselects that project if active,
    and an inactive or unknown one is named, never swapped for another."""
    form = {"project_id": request.query.get("project_id", "")}
    error = await _unusable_project(request, form["project_id"])
    context = await _form_context(request, form, error)
    return render(request, "token_new.html", context, status=_status(error))


def _status(error: ServiceError | None) -> int:
    return 200 if error is None else http_status(error)


async def _unusable_project(
    request: web.Request, project_id: str
) -> ServiceError | None:
    """Why no token can be generated for `project_id`; None if it can (or is unset)."""
    if not project_id:
        return None
    try:
        project = await service(request).get_project(project_id)
    except NotFound as exc:
        return NotFound(f"{exc.message} Choose another project.", param="project_id")
    if project.is_active:
        return None
    return Forbidden(
        f"Project “{project.name}” is inactive, so no token can be generated for it. "
        "Reactivate it on its page, or choose another project.",
        param="project_id",
    )


async def _form_context(
    request: web.Request, form: dict[str, str], error: ServiceError | None = None
) -> dict[str, Any]:
    projects = [p for p in await _projects(request) if p.is_active]
    form.setdefault("duration_minutes", str(DEFAULT_DURATION))
    chosen = form.get("project_id", "")
    return {
        "projects": projects,
        "selected": chosen if any(p.id == chosen for p in projects) else "",
        "durations": DURATIONS,
        "form": form,
        "error": error,
    }


async def create_token_action(request: web.Request) -> web.Response:
    """Generate a token, then 303 to the page that shows its value once."""
    form = await request.post()
    fields = {
        name: text(form, name)
        for name in (
            "project_id",
            "duration_minutes",
            "max_requests",
            "rate_limit_per_hour",
            "max_concurrent",
            *POLICY_INPUTS,
        )
    }
    audit.note(request, project_id=fields["project_id"] or None)
    try:
        created = await _create(request, form, fields["project_id"])
    except ServiceError as exc:
        audit.note(request, reason=exc.message)
        if isinstance(exc, Forbidden):
            exc = await _unusable_project(request, fields["project_id"]) or exc
        context = await _form_context(request, fields, exc)
        return render(request, "token_new.html", context, status=http_status(exc))
    audit.note(request, token_id=created.token.id)
    key = state(request).minted.put(MintedValue(created.token.id, created.value))
    location = URL(created_url(created.token.id)).with_query({SHOW_PARAM: key})
    raise web.HTTPSeeOther(location)


async def _create(
    request: web.Request, form: Mapping[str, Any], project_id: str
) -> NewToken:
    if not project_id:
        raise ServiceError("Choose a project.", param="project_id")
    return await service(request).create_token(
        project_id=project_id,
        duration_minutes=required_int(form, "duration_minutes"),
        max_requests=optional_int(form, "max_requests"),
        rate_limit_per_hour=optional_int(form, "rate_limit_per_hour"),
        max_concurrent=optional_int(form, "max_concurrent"),
        policy=policy_of_form(form),
    )


def policy_of_form(form: Mapping[str, Any]) -> dict[str, Any]:
    """The policy fields of the generate form (what is left empty is not limited)."""
    fields: dict[str, Any] = {}
    bind = _bind_lines(text(form, "bind"))
    if bind:
        fields["bind"] = bind
    models = text(form, "allowed_models").replace(",", " ").split()
    if models:
        fields["allowed_models"] = models
    cap = optional_int(form, "max_output_tokens_cap")
    if cap is not None:
        fields["max_output_tokens_cap"] = cap
    if text(form, "no_streaming"):
        fields["allow_streaming"] = False
    return fields


def _bind_lines(lines: str) -> dict[str, str]:
    """`key=value` lines (blank ones skipped, spaces around either side trimmed)."""
    bind: dict[str, str] = {}
    for line in lines.splitlines():
        if not line.strip():
            continue
        key, sign, value = line.partition("=")
        if not sign:
            raise ServiceError(
                f"Write each bound header as key=value, one per line: {line[:80]!r}.",
                param="bind",
            )
        bind[key.strip()] = value.strip()
    return bind


async def token_created_page(request: web.Request) -> web.Response:
    """A new token's value, the first time this page is loaded; afterwards a page
    saying it was shown once (the value is kept nowhere else)."""
    token = await service(request).get_token(request.match_info["token_id"])
    minted = state(request).minted.take(request.query.get(SHOW_PARAM, ""))
    value = minted.value if minted is not None and minted.token_id == token.id else None
    context = {
        "token": token,
        "value": value,
        "project": await service(request).get_project(token.project_id),
        "base_url": proxy_base_url(request),
    }
    return render(request, "token_created.html", context)


async def token_page(request: web.Request) -> web.Response:
    """One token: limits, use, expiry and its recent usage."""
    token = await service(request).get_token(request.match_info["token_id"])
    project = await service(request).get_project(token.project_id)
    now = state(request).now()
    totals = await repository(request).usage_totals(
        since=now - timedelta(days=USAGE_DAYS), until=now, token_id=token.id
    )
    policy = token.policy or TokenPolicy()
    context = {
        "token": token,
        "project": project,
        "totals": totals,
        "usage_days": USAGE_DAYS,
        "policy": policy,
        "bound": [(binding_header(key), value) for key, value in policy.bind.items()],
        "defaults": project.policy,
    }
    return render(request, "token.html", context)


async def confirm_revoke_page(request: web.Request) -> web.Response:
    """Ask before revoking a token."""
    token = await service(request).get_token(request.match_info["token_id"])
    return render_confirm(
        request,
        title=f"Revoke token …{token.token_hint}?",
        message="The token stops working at once, for every client using it. "
        "This cannot be undone.",
        action=f"{token_url(token.id)}/revoke",
        button="Revoke token",
    )


async def revoke_token_action(request: web.Request) -> web.Response:
    """Revoke the token, then back to its page."""
    audit.note(request, token_id=request.match_info["token_id"])
    token = await service(request).get_token(request.match_info["token_id"])
    audit.note(request, project_id=token.project_id)
    await service(request).revoke_token(token.id)
    notice = f"Token {TOKEN_PREFIX}…{token.token_hint} revoked."
    raise see_other(request, token_url(token.id), notice)


def add_routes(app: web.Application) -> None:
    """Register the token pages."""
    router = app.router
    router.add_get("/tokens", tokens_page)
    router.add_post("/tokens", create_token_action)
    router.add_get("/tokens/new", new_token_page)
    router.add_get("/tokens/{token_id}", token_page)
    # GET only: a HEAD (a link checker, a prefetch) must not use up the one showing.
    router.add_get("/tokens/{token_id}/created", token_created_page, allow_head=False)
    router.add_get("/tokens/{token_id}/revoke", confirm_revoke_page)
    router.add_post("/tokens/{token_id}/revoke", revoke_token_action)
