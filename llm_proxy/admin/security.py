"""Admin request guards: basic auth in constant time, CSRF tokens, same-origin checks
and the security headers every admin response carries. No page logic here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from aiohttp import BasicAuth, hdrs, web
from aiohttp.typedefs import Handler, Middleware
from aiohttp_basicauth import BasicAuthMiddleware
from yarl import URL

from ..audit.trail import UNKNOWN_ACTOR, auth_failed

REALM: Final = "llm-proxy admin"
CSRF_FIELD: Final = "csrf_token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
CHALLENGE_PAGE: Final = (
    "<!doctype html>\n"
    '<html lang="en"><head><meta charset="utf-8">'
    "<title>Sign in required · llm-proxy admin</title></head>\n"
    "<body><h1>Authentication required</h1>\n"
    "<p>The admin pages need the admin user name and password (ADMIN_USER and "
    "ADMIN_PASSWORD). Reload the page to be asked for them again.</p></body></html>\n"
)
PAGE_CACHE: Final = "no-store"
STATIC_CACHE: Final = "private, max-age=86400"  # URLs carry a content hash


class ConstantTimeBasicAuth(BasicAuthMiddleware):  # type: ignore[misc]
    """aiohttp-basicauth with credentials compared in constant time (both, always)."""

    def __init__(self, username: str, password: str) -> None:
        super().__init__(username=username, password=password, realm=REALM)
        self._user = username.encode()
        self._password = password.encode()

    def parse_auth_header(self, request: web.Request) -> BasicAuth | None:
        """The Authorization header decoded as UTF-8, as browsers send it."""
        header = request.headers.get(hdrs.AUTHORIZATION)
        if not header:
            return None
        try:
            return BasicAuth.decode(header, encoding="utf-8")
        except ValueError:
            return None

    def challenge(self) -> web.Response:
        """The 401 asking for credentials, with a page for when the prompt is cancelled."""
        return web.Response(
            status=401,
            text=CHALLENGE_PAGE,
            content_type="text/html",
            headers={hdrs.WWW_AUTHENTICATE: f'Basic realm="{REALM}"'},
        )

    async def authenticate(self, request: web.Request) -> bool:
        """Whether the request carries the admin credentials; a refusal of credentials
        that were sent is audited (a request without any is the browser asking)."""
        auth = self.parse_auth_header(request)
        if auth is None:
            if request.headers.get(hdrs.AUTHORIZATION):
                self._refused(request, UNKNOWN_ACTOR, "malformed credentials")
            return False
        user_ok, password_ok = self._matches(auth.login, auth.password)
        if user_ok and password_ok:
            return True
        if user_ok:
            self._refused(request, auth.login, "wrong password")
        else:
            self._refused(request, UNKNOWN_ACTOR, "unknown user")
        return False

    def _matches(self, username: str, password: str) -> tuple[bool, bool]:
        """Whether the user and the password match; both comparisons always run."""
        user_ok = hmac.compare_digest(username.encode(), self._user)
        password_ok = hmac.compare_digest(password.encode(), self._password)
        return user_ok, password_ok

    @staticmethod
    def _refused(request: web.Request, actor: str, reason: str) -> None:
        auth_failed(request, surface="admin", actor=actor, reason=reason)


def csrf_token(secret: bytes, username: str, password: str) -> str:
    """The forms' CSRF token: an HMAC of the credentials under a per-process secret."""
    message = hashlib.sha256(f"{username}\0{password}".encode()).digest()
    return hmac.new(secret, b"admin-csrf:" + message, hashlib.sha256).hexdigest()


def forwarded_origin(request: web.Request) -> tuple[str, str]:
    """The scheme and host the browser used: X-Forwarded-* when a proxy set them."""
    proto = _first(request.headers.get("X-Forwarded-Proto", ""))
    host = _first(request.headers.get("X-Forwarded-Host", ""))
    return proto.lower() or request.scheme, host or request.host


def _first(value: str) -> str:
    return value.split(",")[0].strip()


def request_origin(request: web.Request) -> tuple[set[str], set[str]]:
    """Schemes and hosts this request may have come from (direct or via a proxy)."""
    scheme, host = forwarded_origin(request)
    return {request.scheme, scheme}, {request.host, host}


def is_same_origin(origin: str, request: web.Request) -> bool:
    """Whether `origin` (an Origin or Referer value) is this site.

    The port is compared only when the Host header names one: nginx forwards `$host`,
    which drops it.
    """
    try:
        url = URL(origin)
    except ValueError:
        return False
    schemes, hosts = request_origin(request)
    if not url.absolute or url.scheme not in schemes:
        return False
    return any(_host_matches(url, host) for host in hosts)


def _host_matches(url: URL, host: str) -> bool:
    try:
        want = URL(f"{url.scheme}://{host}")
    except ValueError:
        return False
    if want.host is None or want.host != url.host:
        return False
    return want.explicit_port is None or want.port == url.port


def check_csrf(request: web.Request, form: Mapping[str, object], token: str) -> None:
    """Refuse (403) a state-changing request from another site or without the token."""
    origin = request.headers.get(hdrs.ORIGIN) or request.headers.get(hdrs.REFERER)
    if not origin or not is_same_origin(origin, request):
        raise web.HTTPForbidden(
            reason="Cross-site request refused",
            text="The request did not come from this site (Origin/Referer).",
        )
    given = form.get(CSRF_FIELD)
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode(), token.encode()
    ):
        raise web.HTTPForbidden(
            reason="CSRF token missing or wrong",
            text="The form's security token is missing or out of date; reload the page.",
        )


def csrf_middleware(token: str) -> Middleware:
    """Check the CSRF token and Origin/Referer of every non-GET request."""

    @web.middleware
    async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in SAFE_METHODS:
            check_csrf(request, await request.post(), token)
        return await handler(request)

    return csrf


def security_headers_middleware(static_prefix: str) -> Middleware:
    """Security headers and Cache-Control on every admin response, errors included."""

    @web.middleware
    async def security_headers(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _stamp(exc, PAGE_CACHE)
            raise
        is_static = request.path.startswith(static_prefix) and response.status == 200
        _stamp(response, STATIC_CACHE if is_static else PAGE_CACHE)
        return response

    return security_headers


def _stamp(response: web.StreamResponse, cache_control: str) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers[hdrs.CACHE_CONTROL] = cache_control
