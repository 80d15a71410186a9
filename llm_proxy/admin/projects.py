"""Project pages: list and search, create, detail, edit, key rotation, browser origins,
response cache, activation, bulk token revocation and deletion. Writes go through `ManagementService`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final

from aiohttp import web

from ..audit import trail as audit
from ..domain_errors import ErrorKind
from ..errors import http_status
from ..management.service import ServiceError
from ..storage import Project, RevokeCounts, TokenFilter
from .forms import PAGE_SIZE, Pager, page_number, text
from .pages import bars
from .render import render, render_confirm, repository, see_other, service, state

USAGE_DAYS: Final = 7


def project_url(project_id: str) -> str:
    """The detail page of a project."""
    return f"/admin/projects/{project_id}"


async def projects_page(request: web.Request) -> web.Response:
    """The project list, with name search and pagination."""
    search = request.query.get("q", "").strip()
    page = page_number(request.query)
    found = await service(request).list_projects(
        limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, search=search or None
    )
    context = {"projects": found.items, "pager": Pager(page, found.total), "q": search}
    return render(request, "projects.html", context)


async def new_project_page(request: web.Request) -> web.Response:
    """The empty create-project form."""
    return render(request, "project_new.html", {"form": {}, "error": None})


async def create_project_action(request: web.Request) -> web.Response:
    """Create a project from the form; the form again with the error if refused."""
    form = await request.post()
    fields = {
        "name": text(form, "name"),
        "description": text(form, "description"),
        "allowed_origins": text(form, "allowed_origins"),
        "require_origin": text(form, "require_origin"),
    }
    try:
        project = await service(request).create_project(
            name=fields["name"],
            description=fields["description"],
            api_key=text(form, "openai_api_key"),
            **_origin_changes(form),
        )
    except ServiceError as exc:
        audit.note(request, reason=exc.message)
        context = {"form": fields, "error": exc}
        return render(request, "project_new.html", context, status=http_status(exc))
    audit.note(request, project_id=project.id)
    raise see_other(
        request, project_url(project.id), f"Project “{project.name}” created."
    )


async def project_page(request: web.Request) -> web.Response:
    """One project: its settings, actions, tokens and usage."""
    project = await service(request).get_project(request.match_info["project_id"])
    return render(request, "project.html", await _detail_context(request, project))


async def _detail_context(
    request: web.Request, project: Project, error: ServiceError | None = None
) -> dict[str, Any]:
    now = state(request).now()
    tokens = await service(request).list_tokens(
        TokenFilter(project_id=project.id), limit=PAGE_SIZE, offset=0
    )
    since = now - timedelta(days=USAGE_DAYS)
    usage = repository(request)
    days = await usage.usage_by_day(since=since, until=now, project_id=project.id)
    return {
        "project": project,
        "tokens": tokens,
        "totals": await usage.usage_totals(
            since=since, until=now, project_id=project.id
        ),
        "days": bars(days),
        "usage_days": USAGE_DAYS,
        "error": error,
    }


async def _update(
    request: web.Request, done: Callable[[Project], str], **changes: Any
) -> web.Response:
    """Apply changes; back to the detail page with `done(project)` as its notice,
    or showing the error if refused."""
    project_id = request.match_info["project_id"]
    audit.note(request, project_id=project_id, fields=sorted(changes))
    try:
        project = await service(request).update_project(project_id, **changes)
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            raise
        return await _refused(request, project_id, exc)
    raise see_other(request, project_url(project_id), done(project))


async def _refused(
    request: web.Request, project_id: str, exc: ServiceError
) -> web.Response:
    """The detail page again, showing why a change was refused (and auditing it)."""
    audit.note(request, project_id=project_id, reason=exc.message)
    project = await service(request).get_project(project_id)
    context = await _detail_context(request, project, exc)
    return render(request, "project.html", context, status=http_status(exc))


async def edit_project_action(request: web.Request) -> web.Response:
    """Change the name and description."""
    form = await request.post()
    return await _update(
        request,
        lambda project: f"Project “{project.name}” saved.",
        name=text(form, "name"),
        description=text(form, "description"),
    )


async def rotate_key_action(request: web.Request) -> web.Response:
    """Replace the upstream key (applies to the next proxied request)."""
    form = await request.post()
    return await _update(request, _rotated, api_key=text(form, "openai_api_key"))


def _rotated(project: Project) -> str:
    return (
        f"Upstream key of “{project.name}” rotated to {project.api_key_hint}; "
        "the next proxied request uses it."
    )


async def origins_action(request: web.Request) -> web.Response:
    """Replace the browser origins and the Origin requirement (next request)."""
    form = await request.post()
    return await _update(
        request,
        lambda project: f"Browser access of “{project.name}” saved.",
        **_origin_changes(form),
    )


def _origin_changes(form: Mapping[str, Any]) -> dict[str, Any]:
    """The origins field (one per line, or separated by blanks or commas) and the
    require-origin checkbox."""
    origins = [
        part for part in re.split(r"[\s,]+", text(form, "allowed_origins")) if part
    ]
    return {
        "allowed_origins": origins,
        "require_origin": text(form, "require_origin") == "1",
    }


async def cache_action(request: web.Request) -> web.Response:
    """Set the project's response-cache lifetime; empty: back to the default."""
    form = await request.post()
    try:
        changes = _cache_changes(text(form, "cache_ttl_seconds"))
    except ServiceError as exc:
        return await _refused(request, request.match_info["project_id"], exc)
    return await _update(
        request, lambda project: f"Response cache of “{project.name}” saved.", **changes
    )


def _cache_changes(value: str) -> dict[str, Any]:
    """The cache field: blank clears it, a whole number of seconds sets it."""
    value = value.strip()
    if not value:
        return {"clear_cache_ttl_seconds": True}
    try:
        return {"cache_ttl_seconds": int(value)}
    except ValueError:
        raise ServiceError(
            "cache_ttl_seconds must be a whole number of seconds, or empty for the "
            "default.",
            param="cache_ttl_seconds",
        ) from None


async def activation_action(request: web.Request) -> web.Response:
    """Deactivate (`is_active=0`) or reactivate (`is_active=1`) the project."""
    form = await request.post()
    active = text(form, "is_active") == "1"
    audit.note(request, actions=audit.project_actions({"is_active": active}))
    return await _update(request, _activation_notice, is_active=active)


def _activation_notice(project: Project) -> str:
    if project.is_active:
        return f"Project “{project.name}” reactivated."
    return (
        f"Project “{project.name}” deactivated: its tokens are refused until it is "
        "reactivated."
    )


async def confirm_delete_page(request: web.Request) -> web.Response:
    """Ask before deleting a project and all of its tokens."""
    project = await service(request).get_project(request.match_info["project_id"])
    return render_confirm(
        request,
        title=f"Delete project {project.name}?",
        message="The project and all of its tokens are deleted; its tokens stop "
        "working at once. Usage history is kept. This cannot be undone.",
        action=f"{project_url(project.id)}/delete",
        button="Delete project",
    )


async def delete_project_action(request: web.Request) -> web.Response:
    """Delete the project, then back to the list."""
    audit.note(request, project_id=request.match_info["project_id"])
    project = await service(request).get_project(request.match_info["project_id"])
    await service(request).delete_project(project.id)
    notice = f"Project “{project.name}” deleted, with its tokens."
    raise see_other(request, "/admin/projects", notice)


async def confirm_revoke_all_page(request: web.Request) -> web.Response:
    """Ask before revoking every token of a project."""
    project = await service(request).get_project(request.match_info["project_id"])
    return render_confirm(
        request,
        title=f"Revoke all tokens of {project.name}?",
        message="Every token of this project stops working at once. The project "
        "stays; new tokens can be generated afterwards.",
        action=f"{project_url(project.id)}/revoke-tokens",
        button="Revoke all tokens",
    )


async def revoke_all_action(request: web.Request) -> web.Response:
    """Revoke every token of the project, then back to it."""
    audit.note(request, project_id=request.match_info["project_id"])
    project = await service(request).get_project(request.match_info["project_id"])
    counts = await service(request).revoke_project_tokens(project.id)
    audit.note(request, revoked_count=counts.revoked_count)
    raise see_other(request, project_url(project.id), _revoked_notice(project, counts))


def _revoked_notice(project: Project, counts: RevokeCounts) -> str:
    revoked, already = counts.revoked_count, counts.already_revoked_count
    if revoked:
        plural = "s" if revoked != 1 else ""
        head = f"{revoked} token{plural} of “{project.name}” revoked"
    else:
        head = f"No token of “{project.name}” was active"
    return head + (f" ({already} already revoked)." if already else ".")


def add_routes(app: web.Application) -> None:
    """Register the project pages."""
    router = app.router
    router.add_get("/projects", projects_page)
    router.add_post("/projects", create_project_action)
    router.add_get("/projects/new", new_project_page)
    router.add_get("/projects/{project_id}", project_page)
    router.add_post("/projects/{project_id}", edit_project_action)
    router.add_post("/projects/{project_id}/key", rotate_key_action)
    router.add_post("/projects/{project_id}/origins", origins_action)
    router.add_post("/projects/{project_id}/cache", cache_action)
    router.add_post("/projects/{project_id}/active", activation_action)
    router.add_get("/projects/{project_id}/delete", confirm_delete_page)
    router.add_post("/projects/{project_id}/delete", delete_project_action)
    router.add_get("/projects/{project_id}/revoke-tokens", confirm_revoke_all_page)
    router.add_post("/projects/{project_id}/revoke-tokens", revoke_all_action)
