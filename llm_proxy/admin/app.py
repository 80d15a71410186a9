"""`create_admin_app(settings)`: the admin sub-app, its middleware chain and routes.

Chain, outermost first: security headers (on everything, errors included), HTML error
pages, basic auth, the audit of changes (a refused CSRF check is audited too),
CSRF/Origin checks for every POST. Mounted at `/admin`.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Final

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..audit.actions import audit_middleware
from ..clock import utc_now
from ..config import Settings
from ..domain_errors import DomainError
from ..errors import http_status
from . import audit, pages, projects, tokens
from .render import ADMIN_STATE_KEY, AdminState, Now, render, static_urls
from .security import (
    ConstantTimeBasicAuth,
    csrf_middleware,
    csrf_token,
    security_headers_middleware,
)

log = logging.getLogger(__name__)

PREFIX: Final = "/admin"
STATIC_PREFIX: Final = f"{PREFIX}/static"


def create_admin_app(settings: Settings, *, now: Now = utc_now) -> web.Application:
    """The admin pages; needs ADMIN_USER and ADMIN_PASSWORD (checked by the caller)."""
    user, password = settings.admin_user, settings.admin_password
    if not user or not password:
        raise ValueError("the admin pages need ADMIN_USER and ADMIN_PASSWORD")
    token = csrf_token(secrets.token_bytes(32), user, password)
    app = web.Application(
        middlewares=[
            security_headers_middleware(STATIC_PREFIX),
            html_errors_middleware(),
            ConstantTimeBasicAuth(user, password),
            audit_middleware(audit.AUDITED, user),
            csrf_middleware(token),
        ]
    )
    static_dir = Path(__file__).resolve().parent / "static"
    app[ADMIN_STATE_KEY] = AdminState(
        csrf_token=token, now=now, static_urls=static_urls(static_dir, STATIC_PREFIX)
    )
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("llm_proxy.admin", "templates"),
        autoescape=True,
        default_helpers=False,
        undefined=jinja2.StrictUndefined,
    )
    pages.add_routes(app)
    projects.add_routes(app)
    tokens.add_routes(app)
    audit.add_routes(app)
    app.router.add_static("/static", static_dir, append_version=False)
    return app


def html_errors_middleware() -> Middleware:
    """Errors inside /admin become HTML pages (the root app would answer JSON)."""

    @web.middleware
    async def html_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404 and request.path == PREFIX:
                raise web.HTTPPermanentRedirect(f"{PREFIX}/") from None
            return _error_page(request, exc.status, exc.reason, exc.text or "")
        except DomainError as exc:
            return _error_page(request, http_status(exc), exc.code, exc.message)
        except Exception:
            log.exception("admin page failed: %s %s", request.method, request.path)
            return _error_page(request, 500, "Internal error", "See the server log.")

    return html_errors


def _error_page(
    request: web.Request, status: int, title: str, message: str
) -> web.Response:
    if message.startswith(f"{status}:"):  # aiohttp's default text repeats the reason
        message = ""
    context = {"status": status, "title": title, "message": message}
    return render(request, "error.html", context, status=status)
