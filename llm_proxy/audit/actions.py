"""The audit middleware: a request to an audited handler becomes a record per action.

The app names its audited handlers and their actions; the handler notes the ids it
acted on (`trail.note`). Success is a response (or redirect) below 400; a rule's
refusal, a refused form or a failed CSRF check is a `failure` with its message as the
reason; anything unexpected is an `error` whose reason names only its class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .trail import AUDIT_NOTE_KEY, AuditNote, AuditTrail, trail_of

REQUEST_ID_HEADER: Final = "X-Request-ID"


def audit_middleware(actions: Mapping[Any, str], actor: str) -> Middleware:
    """Audit the handlers of `actions` (handler -> action) as done by `actor`."""

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        action = actions.get(request.match_info.handler)
        trail = trail_of(request)
        if action is None or trail is None:
            return await handler(request)
        request_id = trail.request_id(request)
        try:
            response = await handler(request)
        except Exception as exc:
            outcome, reason = outcome_of(exc)
            _record(trail, request, action, actor, outcome, reason)
            if isinstance(exc, web.HTTPException):
                exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        if response.status < 400:
            _record(trail, request, action, actor, "success", None)
        else:  # a form shown again with the reason it was refused
            _record(trail, request, action, actor, "failure", response.reason)
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return audit


def outcome_of(exc: Exception) -> tuple[str, str | None]:
    """The outcome and reason of a handler that raised `exc`."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:  # a redirect after the change: done
            return "success", None
        return "failure", _message(exc) or exc.reason
    message = _message(exc)
    if message is not None:  # a rule refused it (its message names no secret)
        return "failure", message
    return "error", f"internal error ({type(exc).__name__})"


def _message(exc: Exception) -> str | None:
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) else None


def _record(
    trail: AuditTrail,
    request: web.Request,
    action: str,
    actor: str,
    outcome: str,
    reason: str | None,
) -> None:
    found = request.get(AUDIT_NOTE_KEY) or AuditNote()
    for each in found.actions or (action,):
        trail.record(
            request,
            each,
            actor=actor,
            outcome=outcome,
            reason=None if outcome == "success" else (found.reason or reason),
            project_id=found.project_id,
            token_id=found.token_id,
            metadata=found.metadata,
        )
