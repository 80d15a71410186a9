"""The OpenAPI 3.1 document of the management API, served at `/manage/openapi.json`.

Kept next to the code it describes; a test checks that its paths and methods are
exactly the routes `api.py` registers.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from .. import __version__
from ..origins import MAX_ORIGINS
from .policy import (
    MAX_BIND_KEYS,
    MAX_GLOB_CHARS,
    MAX_MODEL_GLOBS,
    MAX_OUTPUT_TOKENS_CAP,
)
from .service import MAX_CACHE_TTL_SECONDS

_ERROR = {"$ref": "#/components/responses/Error"}
_BEARER: list[dict[str, list[str]]] = [{"managementToken": []}]


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _body(ref: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
        },
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": _BEARER,
        "responses": {**responses, "400": _ERROR, "401": _ERROR},
    }
    if body:
        operation["requestBody"] = _body(body)
    if params:
        operation["parameters"] = params
    return operation


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, kind: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "schema": {"type": kind},
        "description": description,
    }


_PAGING = [
    _query("limit", "integer", "Page size, 1-1000 (default 100)."),
    _query("offset", "integer", "Items to skip (default 0)."),
]
_NO_CONTENT = {"204": {"description": "Done."}}
_AUDIT_FILTERS = [
    _query("action", "string", "e.g. project.create, token.revoke, auth.failed."),
    _query("actor", "string", "management_api, or the admin user name."),
    _query("project_id", "string", "Only events naming this project."),
    _query("token_id", "string", "Only events naming this token."),
    _query("outcome", "string", "success, failure, denied or error."),
    _query("start_time", "string", "From this time on (ISO 8601; no zone: UTC)."),
    _query("end_time", "string", "Before this time (ISO 8601; no zone: UTC)."),
    _query("page", "integer", "Page number from 1 (default 1)."),
    _query("page_size", "integer", "Events per page, 1-100 (default 20)."),
]
_PROJECT = _json(_ref("Project"))
_NOT_FOUND = {"404": _ERROR}


def _paths() -> dict[str, Any]:
    project_id = [_path_param("project_id")]
    token_id = [_path_param("token_id")]
    return {
        "/manage/projects": {
            "post": _op(
                "Create a project",
                {"201": _json(_ref("Project"), "Created"), "409": _ERROR},
                body="ProjectCreate",
            ),
            "get": _op(
                "List projects (total in X-Total-Count)",
                {"200": _json({"type": "array", "items": _ref("Project")})},
                params=[*_PAGING, _query("search", "string", "Name contains.")],
            ),
            "patch": _op(
                "Update a project named in the body",
                {"200": _PROJECT, **_NOT_FOUND, "409": _ERROR},
                body="ProjectUpdateWithId",
            ),
            "delete": _op(
                "Delete a project named in the body, and its tokens",
                {**_NO_CONTENT, **_NOT_FOUND},
                body="ProjectId",
            ),
        },
        "/manage/projects/{project_id}": {
            "get": _op(
                "Get a project", {"200": _PROJECT, **_NOT_FOUND}, params=project_id
            ),
            "patch": _op(
                "Update a project",
                {"200": _PROJECT, **_NOT_FOUND, "409": _ERROR},
                body="ProjectUpdate",
                params=project_id,
            ),
            "delete": _op(
                "Delete a project and its tokens",
                {**_NO_CONTENT, **_NOT_FOUND},
                params=project_id,
            ),
        },
        "/manage/projects/{project_id}/tokens/revoke": {
            "post": _op(
                "Revoke every token of a project",
                {"200": _json(_ref("RevokeCounts")), **_NOT_FOUND},
                params=project_id,
            ),
        },
        "/manage/tokens": {
            "post": _op(
                "Create a withering token (its value is shown only here)",
                {
                    "201": _json(_ref("TokenCreated"), "Created"),
                    "403": _ERROR,
                    **_NOT_FOUND,
                },
                body="TokenCreate",
            ),
            "get": _op(
                "List tokens (total in X-Total-Count)",
                {"200": _json({"type": "array", "items": _ref("Token")})},
                params=[
                    *_PAGING,
                    _query("project_id", "string", "Only this project's tokens."),
                    _query("active", "boolean", "true: usable now; false: the rest."),
                ],
            ),
            "delete": _op(
                "Revoke a token by value or id (idempotent; 404 when unknown)",
                {**_NO_CONTENT, **_NOT_FOUND},
                body="TokenRevoke",
            ),
        },
        "/manage/tokens/lookup": {
            "post": _op(
                "Find a token by its value (kept out of URLs and access logs)",
                {"200": _json(_ref("Token")), **_NOT_FOUND},
                body="TokenLookup",
            ),
        },
        "/manage/tokens/{token_id}": {
            "get": _op(
                "Get a token",
                {"200": _json(_ref("Token")), **_NOT_FOUND},
                params=token_id,
            ),
            "delete": _op(
                "Revoke a token (idempotent; 404 when unknown)",
                {**_NO_CONTENT, **_NOT_FOUND},
                params=token_id,
            ),
        },
        "/manage/audit": {
            "get": _op(
                "List audit events, newest first (actions and refused sign-ins)",
                {"200": _json(_ref("AuditPage"))},
                params=_AUDIT_FILTERS,
            ),
        },
        "/manage/audit/{event_id}": {
            "get": _op(
                "Get an audit event",
                {"200": _json(_ref("AuditEvent")), **_NOT_FOUND},
                params=[_path_param("event_id")],
            ),
        },
        "/manage/openapi.json": {
            "get": {
                "summary": "This document (no authentication)",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
    }


def _string(fmt: str | None = None, nullable: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": ["string", "null"] if nullable else "string"}
    if fmt:
        schema["format"] = fmt
    return schema


def _integer(nullable: bool = False, minimum: int = 1) -> dict[str, Any]:
    kind = ["integer", "null"] if nullable else "integer"
    return {"type": kind, "minimum": minimum}


def _max_concurrent(default_setting: str) -> dict[str, Any]:
    return {
        **_integer(nullable=True),
        "description": "Cap on calls in flight at once (streams included);"
        f" null: the {default_setting} default.",
    }


_ORIGIN_FIELDS: dict[str, Any] = {
    "allowed_origins": {
        "type": ["array", "null"],
        "items": {"type": "string"},
        "maxItems": MAX_ORIGINS,
        "description": "Origins whose pages may use the project's tokens:"
        " scheme://host[:port] (http or https, no path) or https://*.example.com"
        " (subdomains only). Empty or null: CORS_ALLOWED_ORIGINS apply.",
    },
    "require_origin": {
        "type": "boolean",
        "description": "Refuse the project's tokens without an Origin header.",
    },
}


def _cache_ttl() -> dict[str, Any]:
    return {
        **_integer(nullable=True, minimum=0),
        "maximum": MAX_CACHE_TTL_SECONDS,
        "description": "With RESPONSE_CACHE=on: seconds the project's answers may be"
        " cached (capped by RESPONSE_CACHE_TTL_MAX), POST calls included; 0: never"
        " cached; null: only what clients ask for (Cache-Control: max-age).",
    }


def _policy(*, bind: bool) -> dict[str, Any]:
    """The policy fields of a token (`bind`) or of a project's defaults."""
    fields: dict[str, Any] = {
        "bind": {
            "type": ["object", "null"],
            "maxProperties": MAX_BIND_KEYS,
            "propertyNames": {"pattern": "^[a-z][a-z0-9_]{0,63}$"},
            "additionalProperties": {
                "type": "string",
                "pattern": "^[!-~]([ -~]{0,254}[!-~])?$",
            },
            "description": "Metadata every call must repeat in a header: user_id ->"
            " X-Proxy-User-Id (the header is not forwarded upstream).",
        },
        "allowed_models": {
            "type": ["array", "null"],
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_GLOB_CHARS},
            "minItems": 1,
            "maxItems": MAX_MODEL_GLOBS,
            "description": "Model names or globs (* ? [...]); null: any model.",
        },
        "max_output_tokens_cap": {
            **_integer(nullable=True),
            "maximum": MAX_OUTPUT_TOKENS_CAP,
            "description": "Ceiling on max_tokens, max_completion_tokens and"
            " max_output_tokens; null: none.",
        },
        "allow_streaming": {
            "type": ["boolean", "null"],
            "description": "Default true.",
        },
    }
    if not bind:
        del fields["bind"]
    return fields


def _shown(fields: dict[str, Any]) -> dict[str, Any]:
    """Policy fields as answers show them: `bind` an object, streaming a boolean."""
    shown = dict(fields)
    if "bind" in shown:
        shown["bind"] = {**shown["bind"], "type": "object"}
    shown["allow_streaming"] = {"type": "boolean"}
    return shown


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _schemas() -> dict[str, Any]:
    update = {
        "name": _string(),
        "description": _string(nullable=True),
        "metadata": {"type": ["object", "null"]},
        "openai_api_key": _string(),
        "is_active": {"type": "boolean"},
        "max_concurrent": _max_concurrent("PROJECT_MAX_CONCURRENT"),
        **_ORIGIN_FIELDS,
        "cache_ttl_seconds": _cache_ttl(),
        **_policy(bind=False),
    }
    token_policy = _policy(bind=True)
    return {
        "Project": _object(
            {
                "project_id": _string("uuid"),
                "name": _string(),
                "description": _string(),
                "metadata": {"type": "object"},
                "api_key_hint": {"type": "string", "description": "e.g. sk-...abcd"},
                "is_active": {"type": "boolean"},
                "max_concurrent": _max_concurrent("PROJECT_MAX_CONCURRENT"),
                **_ORIGIN_FIELDS,
                "cache_ttl_seconds": _cache_ttl(),
                **_shown(_policy(bind=False)),
                "created_at": _string("date-time"),
                "updated_at": _string("date-time"),
            },
            ["project_id", "name", "is_active", "created_at"],
        ),
        "ProjectCreate": _object(
            {
                "name": _string(),
                "description": _string(nullable=True),
                "metadata": {"type": ["object", "null"]},
                "openai_api_key": _string(),
                "max_concurrent": _max_concurrent("PROJECT_MAX_CONCURRENT"),
                **_ORIGIN_FIELDS,
                "cache_ttl_seconds": _cache_ttl(),
                **_policy(bind=False),
            },
            ["name", "openai_api_key"],
        ),
        "ProjectUpdate": _object(update, []),
        "ProjectUpdateWithId": _object(
            {**update, "project_id": _string()}, ["project_id"]
        ),
        "ProjectId": _object({"project_id": _string()}, ["project_id"]),
        "RevokeCounts": _object(
            {
                "revoked_count": _integer(minimum=0),
                "already_revoked_count": _integer(minimum=0),
                "total_tokens": _integer(minimum=0),
            },
            ["revoked_count", "already_revoked_count", "total_tokens"],
        ),
        "TokenCreate": _object(
            {
                "project_id": _string(),
                "duration_minutes": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 525600,
                },
                "max_requests": _integer(nullable=True),
                "rate_limit_per_hour": _integer(nullable=True),
                "max_concurrent": _max_concurrent("TOKEN_MAX_CONCURRENT"),
                **token_policy,
            },
            ["project_id", "duration_minutes"],
        ),
        "TokenCreated": _object(
            {
                "token": _string(),
                "token_id": _string("uuid"),
                "project_id": _string("uuid"),
                "expires_at": _string("date-time"),
                "max_requests": _integer(nullable=True),
                "rate_limit_per_hour": _integer(nullable=True),
                "max_concurrent": _max_concurrent("TOKEN_MAX_CONCURRENT"),
                **_shown(token_policy),
            },
            ["token", "token_id", "project_id", "expires_at"],
        ),
        "Token": _object(
            {
                "token_id": _string("uuid"),
                "token_hint": {"type": "string", "description": "last 4 characters"},
                "project_id": _string("uuid"),
                "expires_at": _string("date-time"),
                "is_active": {"type": "boolean"},
                "request_count": _integer(minimum=0),
                "max_requests": _integer(nullable=True),
                "rate_limit_per_hour": _integer(nullable=True),
                "max_concurrent": _max_concurrent("TOKEN_MAX_CONCURRENT"),
                **_shown(token_policy),
                "created_at": _string("date-time"),
                "last_used_at": _string("date-time", nullable=True),
            },
            ["token_id", "token_hint", "project_id", "expires_at", "is_active"],
        ),
        "TokenLookup": {
            "type": "object",
            "properties": {"token": _string()},
            "required": ["token"],
            "additionalProperties": False,
            "description": "The token's value.",
        },
        "TokenRevoke": {
            "type": "object",
            "properties": {"token": _string(), "token_id": _string()},
            "additionalProperties": False,
            "description": "Exactly one of token (the value) or token_id.",
        },
        "AuditEvent": _object(
            {
                "id": _string(),
                "timestamp": _string("date-time"),
                "action": _string(),
                "actor": _string(),
                "outcome": {"enum": ["success", "failure", "denied", "error"]},
                "client_ip": _string(nullable=True),
                "request_id": _string(nullable=True),
                "project_id": _string(nullable=True),
                "token_id": _string(nullable=True),
                "reason": _string(nullable=True),
                "metadata": {"type": "object", "description": "Never a secret."},
            },
            ["id", "timestamp", "action", "actor", "outcome", "metadata"],
        ),
        "AuditPage": _object(
            {
                "events": {"type": "array", "items": _ref("AuditEvent")},
                "pagination": _object(
                    {
                        "page": _integer(),
                        "page_size": _integer(),
                        "total_count": _integer(minimum=0),
                        "total_pages": _integer(minimum=0),
                        "has_next": {"type": "boolean"},
                        "has_prev": {"type": "boolean"},
                    },
                    [
                        "page",
                        "page_size",
                        "total_count",
                        "total_pages",
                        "has_next",
                        "has_prev",
                    ],
                ),
            },
            ["events", "pagination"],
        ),
        "Error": _object(
            {
                "error": _object(
                    {
                        "message": _string(),
                        "type": _string(),
                        "param": _string(nullable=True),
                        "code": _string(nullable=True),
                    },
                    ["message", "type", "code"],
                )
            },
            ["error"],
        ),
    }


@cache
def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document (built once)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-proxy management API", "version": __version__},
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": {"Error": _json(_ref("Error"), "Error (OpenAI error shape)")},
            "securitySchemes": {
                "managementToken": {"type": "http", "scheme": "bearer"}
            },
        },
    }
