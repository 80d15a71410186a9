"""What the HTTP layers use to audit: action names, the `AuditTrail` protocol, its key,
and the note a handler leaves for the audit middleware. Free of the bus and storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from aiohttp import web

from ..auth.bearer import bearer_token

PROJECT_CREATE: Final = "project.create"
PROJECT_UPDATE: Final = "project.update"
PROJECT_ROTATE_KEY: Final = "project.rotate_key"
PROJECT_ACTIVATE: Final = "project.activate"
PROJECT_DEACTIVATE: Final = "project.deactivate"
PROJECT_DELETE: Final = "project.delete"
PROJECT_REVOKE_TOKENS: Final = "project.revoke_tokens"
TOKEN_CREATE: Final = "token.create"
TOKEN_REVOKE: Final = "token.revoke"
AUTH_FAILED: Final = "auth.failed"
ACTIONS: Final = (
    PROJECT_CREATE,
    PROJECT_UPDATE,
    PROJECT_ROTATE_KEY,
    PROJECT_ACTIVATE,
    PROJECT_DEACTIVATE,
    PROJECT_DELETE,
    PROJECT_REVOKE_TOKENS,
    TOKEN_CREATE,
    TOKEN_REVOKE,
    AUTH_FAILED,
)
# success: done; failure: a rule refused it; denied: the credentials were refused;
# error: the proxy failed while doing it.
OUTCOMES: Final = ("success", "failure", "denied", "error")
# Who acts through the management API: its one shared token names no person.
MANAGEMENT_ACTOR: Final = "management_api"
# A refused sign-in whose user name is not the admin's: never echoed (it may be a
# password typed into the wrong field).
UNKNOWN_ACTOR: Final = "unknown"


class AuditTrail(Protocol):
    """Takes audit records from request handlers; never blocks, never raises."""

    def request_id(self, request: web.Request) -> str:
        """The request's id (the client's X-Request-ID when sane), the same each call."""
        ...

    def record(
        self,
        request: web.Request,
        action: str,
        *,
        actor: str,
        outcome: str = "success",
        reason: str | None = None,
        project_id: str | None = None,
        token_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one action of this request; `metadata` must hold no secret."""
        ...

    def auth_failed(
        self, request: web.Request, *, surface: str, actor: str, reason: str
    ) -> None:
        """Record a refused sign-in on `surface` (management, admin, metrics),
        unless this client has had too many recorded lately (then it is counted)."""
        ...


AUDIT_TRAIL_KEY: Final = web.AppKey("audit_trail", AuditTrail)


def trail_of(request: web.Request) -> AuditTrail | None:
    """The app's audit trail; None in an app assembled without one."""
    return request.config_dict.get(AUDIT_TRAIL_KEY)


def auth_failed(request: web.Request, *, surface: str, actor: str, reason: str) -> None:
    """Record a refused sign-in, when the app has an audit trail."""
    trail = trail_of(request)
    if trail is not None:
        trail.auth_failed(request, surface=surface, actor=actor, reason=reason)


def bearer_refusal(authorization: str | None) -> str:
    """Why a bearer credential was refused, naming no part of it."""
    if not authorization:
        return "no credentials"
    if bearer_token(authorization) is None:
        return "not a bearer token"
    return "wrong token"


def project_actions(changes: Mapping[str, Any]) -> tuple[str, ...]:
    """The actions a change of these project fields is: a key rotation, an
    (de)activation, and an update of the other fields, as many as apply."""
    actions = []
    if set(changes) - {"openai_api_key", "is_active", "project_id"}:
        actions.append(PROJECT_UPDATE)
    if "openai_api_key" in changes:
        actions.append(PROJECT_ROTATE_KEY)
    if "is_active" in changes:
        active = changes["is_active"] is not False
        actions.append(PROJECT_ACTIVATE if active else PROJECT_DEACTIVATE)
    return tuple(actions) or (PROJECT_UPDATE,)


@dataclass(slots=True)
class AuditNote:
    """What a handler tells the audit middleware: the ids it acted on, the actions
    when they depend on the input, why it refused, and secret-free metadata."""

    project_id: str | None = None
    token_id: str | None = None
    actions: tuple[str, ...] = ()
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


AUDIT_NOTE_KEY: Final = web.RequestKey("audit_note", AuditNote)


def note(
    request: web.Request,
    *,
    project_id: str | None = None,
    token_id: str | None = None,
    actions: tuple[str, ...] | None = None,
    reason: str | None = None,
    **metadata: Any,
) -> AuditNote:
    """Add to this request's note (what is given replaces what was there)."""
    found = request.get(AUDIT_NOTE_KEY)
    if found is None:
        found = request[AUDIT_NOTE_KEY] = AuditNote()
    found.project_id = project_id or found.project_id
    found.token_id = token_id or found.token_id
    found.actions = found.actions if actions is None else actions
    found.reason = reason or found.reason
    found.metadata.update(metadata)
    return found
