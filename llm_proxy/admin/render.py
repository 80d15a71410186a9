"""Rendering admin pages: the sub-app's own state, template context and display helpers.

Context is passed explicitly to every template (aiohttp-jinja2's context processors set
a `str` request key, which aiohttp 3.14 warns about).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiohttp_jinja2
from aiohttp import web
from yarl import URL

from ..keys import REPOSITORY_KEY, SERVICE_KEY
from ..management.service import ManagementService
from ..storage import Repository, Token
from .flash import (
    NOTICE_LIFETIME_S,
    NOTICE_SLOTS,
    VALUE_LIFETIME_S,
    VALUE_SLOTS,
    MintedValue,
    OneTimeSlots,
)
from .security import CSRF_FIELD, forwarded_origin

Now = Callable[[], datetime]
STATIC_FILES: Final = ("admin.css", "admin.js")


NOTICE_PARAM: Final = "notice"


@dataclass(frozen=True, slots=True)
class AdminState:
    """What the admin sub-app needs besides the root app's services."""

    csrf_token: str
    now: Now
    static_urls: Mapping[str, str]  # file name -> URL with a content hash
    notices: OneTimeSlots[str] = field(
        default_factory=lambda: OneTimeSlots(
            capacity=NOTICE_SLOTS, lifetime_s=NOTICE_LIFETIME_S
        )
    )
    minted: OneTimeSlots[MintedValue] = field(
        default_factory=lambda: OneTimeSlots(
            capacity=VALUE_SLOTS, lifetime_s=VALUE_LIFETIME_S
        )
    )


ADMIN_STATE_KEY: Final = web.AppKey("admin_state", AdminState)


def static_urls(static_dir: Path, prefix: str) -> dict[str, str]:
    """Cache-busting URLs of the admin's static files."""
    urls = {}
    for name in STATIC_FILES:
        digest = hashlib.sha256((static_dir / name).read_bytes()).hexdigest()[:12]
        urls[name] = f"{prefix}/{name}?v={digest}"
    return urls


def state(request: web.Request) -> AdminState:
    """The admin sub-app's state."""
    return request.app[ADMIN_STATE_KEY]


def service(request: web.Request) -> ManagementService:
    """The management service on the root app (all writes go through it)."""
    return request.config_dict[SERVICE_KEY]


def repository(request: web.Request) -> Repository:
    """The repository on the root app (usage reads)."""
    return request.config_dict[REPOSITORY_KEY]


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """A page rendered with the common context (CSRF token, clock helpers, assets)."""
    admin = state(request)
    now = admin.now()
    common = {
        "notice": _notice(request, admin),
        "csrf_field": CSRF_FIELD,
        "csrf_token": admin.csrf_token,
        "static": admin.static_urls,
        "path": request.path,
        "now": now,
        "ago": lambda moment: relative(moment, now),
        "utc": utc_text,
        "token_status": lambda token: token_status(token, now),
    }
    return aiohttp_jinja2.render_template(
        f"admin/{template}", request, {**common, **context}, status=status
    )


def see_other(request: web.Request, location: str, notice: str) -> web.HTTPSeeOther:
    """The 303 after a change: to a GET page that shows `notice` once (no secrets)."""
    key = state(request).notices.put(notice)
    return web.HTTPSeeOther(URL(location).update_query({NOTICE_PARAM: key}))


def _notice(request: web.Request, admin: AdminState) -> str | None:
    key = request.query.get(NOTICE_PARAM)
    return None if key is None else admin.notices.take(key)


def render_confirm(
    request: web.Request, *, title: str, message: str, action: str, button: str
) -> web.Response:
    """The page that asks before a destructive `action`; cancelling goes back."""
    back = action.rsplit("/", 1)[0]
    context = {
        "title": title,
        "message": message,
        "action": action,
        "button": button,
        "cancel": back,
    }
    return render(request, "confirm.html", context)


def utc_text(moment: datetime | None) -> str:
    """`2025-01-31 12:00:00 UTC`, or an em dash for no time."""
    if moment is None:
        return "—"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def relative(moment: datetime | None, now: datetime) -> str:
    """`in 14 min`, `3 h ago`, `just now`: how far `moment` is from `now`."""
    if moment is None:
        return "never"
    seconds = (moment - now).total_seconds()
    amount = _duration(abs(seconds))
    if amount is None:
        return "just now"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def _duration(seconds: float) -> str | None:
    if seconds < 45:
        return None
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = round(seconds / 3600)
    if hours < 48:
        return f"{hours} h"
    return f"{round(seconds / 86400)} days"


def token_status(token: Token, now: datetime) -> str:
    """active, revoked, expired or used up."""
    if not token.is_active:
        return "revoked"
    if token.expires_at <= now:
        return "expired"
    if token.max_requests is not None and token.request_count >= token.max_requests:
        return "used up"
    return "active"


def proxy_base_url(request: web.Request) -> str:
    """The proxy's `/v1` URL as this browser reaches it (proxy headers honoured)."""
    scheme, host = forwarded_origin(request)
    return f"{scheme}://{host}/v1"
