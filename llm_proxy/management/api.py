"""The management REST API (`/manage/*`): projects and tokens, bearer-protected.

Request and response shapes are those of docs/api.md; item routes sit beside the
body-addressed ones. Rules live in `service.py`; this module only adapts HTTP. A rule's
refusal (`ServiceError`) and a bad management token (`AuthError`) are answered by the
root app's `errors.json_errors_middleware`, from the one table in `errors.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..audit import trail as audit
from ..audit.actions import audit_middleware
from ..auth.bearer import bearer_matches
from ..auth.errors import AuthError
from ..clock import utc_iso
from ..keys import SERVICE_KEY
from ..storage import Project, Token, TokenFilter
from .audit_api import get_audit_handler, list_audit_handler
from .openapi import openapi_document
from .policy import (
    PROJECT_POLICY_FIELDS,
    TOKEN_POLICY_FIELDS,
    policy_fields,
    policy_json,
)
from .service import ManagementService, Page, ServiceError
from .validation import (
    Field,
    check_fields,
    query_bool,
    query_int,
    query_text,
    read_json_object,
)

log = logging.getLogger(__name__)

# A policy's fields (their items are checked by the rules, `management.policy`).
PROJECT_POLICY = {
    "allowed_models": Field(list, nullable=True),
    "max_output_tokens_cap": Field(int, nullable=True),
    "allow_streaming": Field(bool, nullable=True),
}
PROJECT_CREATE = {
    "name": Field(str, required=True),
    "description": Field(str, nullable=True),
    "metadata": Field(dict, nullable=True),
    "openai_api_key": Field(str, required=True),
    "max_concurrent": Field(int, nullable=True),
    "allowed_origins": Field(list, nullable=True),
    "require_origin": Field(bool),
    "cache_ttl_seconds": Field(int, nullable=True),
    **PROJECT_POLICY,
}
PROJECT_UPDATE = {
    "name": Field(str),
    "description": Field(str, nullable=True),
    "metadata": Field(dict, nullable=True),
    "openai_api_key": Field(str),
    "is_active": Field(bool),
    "max_concurrent": Field(int, nullable=True),
    "allowed_origins": Field(list, nullable=True),
    "require_origin": Field(bool),
    "cache_ttl_seconds": Field(int, nullable=True),
    **PROJECT_POLICY,
}
TOKEN_CREATE = {
    "project_id": Field(str, required=True),
    "duration_minutes": Field(int, required=True),
    "max_requests": Field(int, nullable=True),
    "rate_limit_per_hour": Field(int, nullable=True),
    "max_concurrent": Field(int, nullable=True),
    "bind": Field(dict, nullable=True),
    **PROJECT_POLICY,
}
TOKEN_DELETE = {"token": Field(str), "token_id": Field(str)}
TOKEN_LOOKUP = {"token": Field(str, required=True)}
PROJECT_DELETE = {"project_id": Field(str, required=True)}
MAX_PAGE = 1000
T = TypeVar("T")


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z suffix, to the second."""
    return None if moment is None else utc_iso(moment)


def project_json(project: Project) -> dict[str, Any]:
    """A project as the API shows it: the upstream key only masked."""
    return {
        "project_id": project.id,
        "name": project.name,
        "description": project.description,
        "metadata": dict(project.metadata),
        "api_key_hint": project.api_key_hint,
        "is_active": project.is_active,
        "max_concurrent": project.max_concurrent,
        "allowed_origins": list(project.allowed_origins),
        "require_origin": project.require_origin,
        "cache_ttl_seconds": project.cache_ttl_seconds,
        **policy_json(project.policy, bind=False),
        "created_at": iso(project.created_at),
        "updated_at": iso(project.updated_at),
    }


def token_json(token: Token) -> dict[str, Any]:
    """A token as the API lists it: never its value, only its last 4 characters."""
    return {
        "token_id": token.id,
        "token_hint": token.token_hint,
        "project_id": token.project_id,
        "expires_at": iso(token.expires_at),
        "is_active": token.is_active,
        "request_count": token.request_count,
        "max_requests": token.max_requests,
        "rate_limit_per_hour": token.rate_limit_per_hour,
        "max_concurrent": token.max_concurrent,
        **policy_json(token.policy, bind=True),
        "created_at": iso(token.created_at),
        "last_used_at": iso(token.last_used_at),
    }


def service_of(request: web.Request) -> ManagementService:
    """The management service, from the root app's state."""
    return request.config_dict[SERVICE_KEY]


def page_window(request: web.Request) -> tuple[int, int]:
    """`?limit=&offset=` of a listing: (limit, offset), checked."""
    limit = query_int(request, "limit", 100, low=1, high=MAX_PAGE)
    return limit, query_int(request, "offset", 0, low=0, high=2**31)


def page_response(
    page: Page[T], to_json: Callable[[T], dict[str, Any]]
) -> web.Response:
    """A page of a listing as a JSON array, its total in X-Total-Count."""
    items = [to_json(item) for item in page.items]
    return json_response(items, headers={"X-Total-Count": str(page.total)})


def json_response(
    data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer encoded with orjson."""
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def management_auth_middleware(management_token: str) -> Middleware:
    """Require `Authorization: Bearer <MANAGEMENT_TOKEN>`, compared in constant time."""
    expected = management_token.encode()

    @web.middleware
    async def management_auth(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path == "/manage/openapi.json":
            return await handler(request)
        given = request.headers.get(hdrs.AUTHORIZATION)
        if not bearer_matches(given, expected):
            audit.auth_failed(
                request,
                surface="management",
                actor=audit.MANAGEMENT_ACTOR,
                reason=audit.bearer_refusal(given),
            )
            raise AuthError(
                "Missing or invalid management token.", code="invalid_management_token"
            )
        return await handler(request)

    return management_auth


# -- projects ------------------------------------------------------------------


async def create_project_handler(request: web.Request) -> web.Response:
    """POST /manage/projects."""
    data = await read_json_object(request)
    check_fields(data, PROJECT_CREATE)
    project = await service_of(request).create_project(
        name=data["name"],
        api_key=data["openai_api_key"],
        description=data.get("description") or "",
        metadata=data.get("metadata") or {},
        max_concurrent=data.get("max_concurrent"),
        allowed_origins=data.get("allowed_origins") or (),
        require_origin=data.get("require_origin", False),
        cache_ttl_seconds=data.get("cache_ttl_seconds"),
        policy=policy_fields(data, PROJECT_POLICY_FIELDS),
    )
    audit.note(request, project_id=project.id)
    return json_response(project_json(project), status=201)


async def list_projects_handler(request: web.Request) -> web.Response:
    """GET /manage/projects: an array, total in X-Total-Count."""
    limit, offset = page_window(request)
    page = await service_of(request).list_projects(
        limit=limit, offset=offset, search=query_text(request, "search")
    )
    return page_response(page, project_json)


async def get_project_handler(request: web.Request) -> web.Response:
    """GET /manage/projects/{project_id}."""
    project = await service_of(request).get_project(request.match_info["project_id"])
    return json_response(project_json(project))


async def update_project_handler(request: web.Request) -> web.Response:
    """PATCH /manage/projects/{project_id} and PATCH /manage/projects (id in body)."""
    data = await read_json_object(request)
    project_id = request.match_info.get("project_id")
    if project_id is None:
        check_fields(data, {**PROJECT_UPDATE, "project_id": Field(str, required=True)})
        project_id = data.pop("project_id")
    else:
        check_fields(data, PROJECT_UPDATE)
    audit.note(
        request,
        project_id=project_id,
        actions=audit.project_actions(data),
        fields=sorted(data),
    )
    description = data.get("description", None)
    metadata = data.get("metadata", None)
    origins = data.get("allowed_origins", None)
    project = await service_of(request).update_project(
        project_id,
        name=data.get("name"),
        description=""
        if "description" in data and description is None
        else description,
        metadata={} if "metadata" in data and metadata is None else metadata,
        api_key=data.get("openai_api_key"),
        is_active=data.get("is_active"),
        max_concurrent=data.get("max_concurrent"),
        clear_max_concurrent="max_concurrent" in data
        and data["max_concurrent"] is None,
        allowed_origins=()
        if "allowed_origins" in data and origins is None
        else origins,
        require_origin=data.get("require_origin"),
        cache_ttl_seconds=data.get("cache_ttl_seconds"),
        clear_cache_ttl_seconds="cache_ttl_seconds" in data
        and data["cache_ttl_seconds"] is None,
        policy=policy_fields(data, PROJECT_POLICY_FIELDS),
    )
    return json_response(project_json(project))


async def delete_project_handler(request: web.Request) -> web.Response:
    """DELETE /manage/projects/{project_id} and DELETE /manage/projects (id in body)."""
    project_id = request.match_info.get("project_id")
    if project_id is None:
        data = await read_json_object(request)
        check_fields(data, PROJECT_DELETE)
        project_id = data["project_id"]
    audit.note(request, project_id=project_id)
    await service_of(request).delete_project(project_id)
    return web.Response(status=204)


async def revoke_project_tokens_handler(request: web.Request) -> web.Response:
    """POST /manage/projects/{project_id}/tokens/revoke: bulk revocation."""
    project_id = request.match_info["project_id"]
    audit.note(request, project_id=project_id)
    counts = await service_of(request).revoke_project_tokens(project_id)
    audit.note(request, revoked_count=counts.revoked_count)
    return json_response(
        {
            "revoked_count": counts.revoked_count,
            "already_revoked_count": counts.already_revoked_count,
            "total_tokens": counts.total_tokens,
        }
    )


# -- tokens ----------------------------------------------------------------------


async def create_token_handler(request: web.Request) -> web.Response:
    """POST /manage/tokens: the only answer that ever carries a token's value."""
    data = await read_json_object(request)
    check_fields(data, TOKEN_CREATE)
    audit.note(request, project_id=data["project_id"])
    created = await service_of(request).create_token(
        project_id=data["project_id"],
        duration_minutes=data["duration_minutes"],
        max_requests=data.get("max_requests"),
        rate_limit_per_hour=data.get("rate_limit_per_hour"),
        max_concurrent=data.get("max_concurrent"),
        policy=policy_fields(data, TOKEN_POLICY_FIELDS),
    )
    token = created.token
    audit.note(request, token_id=token.id, expires_at=iso(token.expires_at))
    body = {
        "token": created.value,
        "token_id": token.id,
        "project_id": token.project_id,
        "expires_at": iso(token.expires_at),
        "max_requests": token.max_requests,
        "rate_limit_per_hour": token.rate_limit_per_hour,
        "max_concurrent": token.max_concurrent,
        **policy_json(token.policy, bind=True),
    }
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


async def list_tokens_handler(request: web.Request) -> web.Response:
    """GET /manage/tokens?project_id=&active=&limit=&offset=."""
    token_filter = TokenFilter(
        project_id=query_text(request, "project_id"),
        active=query_bool(request, "active"),
    )
    limit, offset = page_window(request)
    page = await service_of(request).list_tokens(
        token_filter, limit=limit, offset=offset
    )
    return page_response(page, token_json)


async def get_token_handler(request: web.Request) -> web.Response:
    """GET /manage/tokens/{token_id}."""
    token = await service_of(request).get_token(request.match_info["token_id"])
    return json_response(token_json(token))


async def lookup_token_handler(request: web.Request) -> web.Response:
    """POST /manage/tokens/lookup {token}: a token by its value, kept out of URLs."""
    data = await read_json_object(request)
    check_fields(data, TOKEN_LOOKUP)
    token = await service_of(request).find_token_by_value(data["token"])
    return json_response(token_json(token))


async def delete_token_handler(request: web.Request) -> web.Response:
    """DELETE /manage/tokens/{token_id} or DELETE /manage/tokens {token|token_id}."""
    service = service_of(request)
    token_id = request.match_info.get("token_id")
    if token_id is None:
        data = await read_json_object(request)
        check_fields(data, TOKEN_DELETE)
        if ("token" in data) == ("token_id" in data):
            raise ServiceError(
                "Send exactly one of 'token' or 'token_id'.", param="token"
            )
        if "token" in data:  # by its value: audited by its id, never the value
            token_id = (await service.find_token_by_value(data["token"])).id
        else:
            token_id = data["token_id"]
    audit.note(request, token_id=token_id)
    await service.revoke_token(token_id)
    return web.Response(status=204)


async def openapi_handler(request: web.Request) -> web.Response:
    """GET /manage/openapi.json: the OpenAPI 3.1 description of this API."""
    return json_response(openapi_document())


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/projects", create_project_handler),
    ("GET", "/projects", list_projects_handler),
    ("PATCH", "/projects", update_project_handler),
    ("DELETE", "/projects", delete_project_handler),
    ("GET", "/projects/{project_id}", get_project_handler),
    ("PATCH", "/projects/{project_id}", update_project_handler),
    ("DELETE", "/projects/{project_id}", delete_project_handler),
    ("POST", "/projects/{project_id}/tokens/revoke", revoke_project_tokens_handler),
    ("POST", "/tokens", create_token_handler),
    ("GET", "/tokens", list_tokens_handler),
    ("DELETE", "/tokens", delete_token_handler),
    ("POST", "/tokens/lookup", lookup_token_handler),
    ("GET", "/tokens/{token_id}", get_token_handler),
    ("DELETE", "/tokens/{token_id}", delete_token_handler),
    ("GET", "/audit", list_audit_handler),
    ("GET", "/audit/{event_id}", get_audit_handler),
    ("GET", "/openapi.json", openapi_handler),
)
# The handlers that change something, and the action each one is audited as.
AUDITED: dict[Handler, str] = {
    create_project_handler: audit.PROJECT_CREATE,
    update_project_handler: audit.PROJECT_UPDATE,
    delete_project_handler: audit.PROJECT_DELETE,
    revoke_project_tokens_handler: audit.PROJECT_REVOKE_TOKENS,
    create_token_handler: audit.TOKEN_CREATE,
    delete_token_handler: audit.TOKEN_REVOKE,
}


def create_management_app(management_token: str) -> web.Application:
    """The `/manage` sub-app; the service is read from the root app's state."""
    app = web.Application(
        middlewares=[
            management_auth_middleware(management_token),
            audit_middleware(AUDITED, audit.MANAGEMENT_ACTOR),
        ]
    )
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
