"""CORS on /v1: the proxy answers preflights itself and decides which origins may call.

- `preflight_handler` (OPTIONS with `Origin` and `Access-Control-Request-Method`): a
  preflight carries no token, so it is answered (204, no token, nothing upstream) when
  the origin is allowed server-wide (CORS_ALLOWED_ORIGINS) or by any active project,
  with the allowlist's methods for the path. Any other OPTIONS goes through the chain.
- `CorsPolicy`, the chain's `OriginGate`: before the stages, the `Origin` is kept on
  the call's `Exchange`, and one allowed somewhere gets the CORS headers on every
  answer, the proxy's own errors included; in token auth, when the token's project
  has origins (its own list, else the server-wide one), the origin must be one of
  them (403 `origin_not_allowed`, without CORS headers); a project with no origins
  anywhere is served as before, without CORS headers, so browsers keep their
  same-origin rule; a project with `require_origin` refuses calls without one.

A call without an `Origin` header costs one header lookup and two attribute tests.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from ..auth.origin_index import OriginIndex
from ..auth.tokens import Principal
from ..config import CorsSettings
from ..errors import ApiError, NotAllowedError
from ..origins import OriginSet
from .allowlist import NOT_FOUND, Allowlist, MatchKind, normalise_path
from .chain import method_not_allowed, unknown_endpoint
from .exchange import Exchange

# Request headers a page may send (Access-Control-Allow-Headers), and name prefixes:
# the OpenAI SDKs' own (x-stainless-*) and the proxy's binding headers (x-proxy-*).
SAFE_REQUEST_HEADERS: Final = frozenset(
    {
        "accept",
        "authorization",
        "content-type",
        "idempotency-key",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "x-request-id",
    }
)
SAFE_REQUEST_PREFIXES: Final = ("x-proxy-", "x-stainless-")
# Response headers a page may read besides the CORS-safelisted ones.
EXPOSED_HEADERS: Final = ", ".join(
    (
        "x-request-id",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "retry-after",
        "openai-processing-ms",
        "openai-version",
    )
)
PREFLIGHT_VARY: Final = (
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
)
_UPSTREAM_CORS_PREFIX: Final = "access-control-"


class CorsPolicy:
    """The origins allowed server-wide, the live index of the projects' origins, and
    how long a browser may keep a preflight's answer; the chain's `OriginGate`."""

    __slots__ = ("default", "index", "max_age")

    def __init__(self, settings: CorsSettings, index: OriginIndex) -> None:
        self.default = OriginSet(settings.allowed_origins)
        self.index = index
        self.max_age = str(settings.max_age_s)

    def allows_somewhere(self, origin: str) -> bool:
        """Allowed server-wide or by any active project (a preflight's question)."""
        return self.default.allows(origin) or self.index.allows(origin)

    def admit(self, exchange: Exchange, origin: str) -> None:
        """Before the stages: keep the origin; one allowed somewhere gets CORS headers
        on the proxy's own errors (a page may read why it was refused)."""
        exchange.origin = origin
        if self.allows_somewhere(origin):
            exchange.cors = origin

    def check(self, principal: Principal, exchange: Exchange) -> None:
        """In token auth: the origin must be allowed for the token's project, when
        that project (or the server) lists any; with no list the call is served as
        before CORS existed, without CORS headers, so browsers keep same-origin."""
        rule = principal.origins
        origin = exchange.origin
        if origin is None:
            if rule is not None and rule.require_origin:
                raise origin_required()
            return
        allowed = rule.effective(self.default) if rule else self.default
        if allowed.allows(origin):
            return
        exchange.cors = None  # no CORS headers: the page may not read the answer
        if allowed:
            raise origin_not_allowed()

    def decorate(self, error: ApiError, exchange: Exchange) -> None:
        """The proxy's own error answer to an allowed origin carries the CORS headers."""
        if exchange.cors is not None:
            add_cors_headers(error.headers, exchange.cors)


def origin_not_allowed() -> ApiError:
    """403 for an `Origin` the call may not come from; never with CORS headers."""
    return NotAllowedError(
        403,
        "Calls from this origin are not allowed for this token.",
        code="origin_not_allowed",
    )


def origin_required() -> ApiError:
    """403 for a browser-only token used without an `Origin` header."""
    return NotAllowedError(
        403,
        "This token's project only accepts calls from web pages of its allowed "
        "origins (an Origin header).",
        code="origin_required",
    )


def add_cors_headers(headers: CIMultiDict[str], origin: str) -> None:
    """The CORS headers of an answer to `origin`, replacing any the upstream sent.

    `Vary: Origin` is added beside the upstream's own `Vary` values, never instead.
    """
    names = [name for name in headers if name.lower().startswith(_UPSTREAM_CORS_PREFIX)]
    for name in names:
        headers.popall(name, None)
    headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
    listed = {
        part.strip().lower()
        for value in headers.getall(hdrs.VARY, ())
        for part in value.split(",")
    }
    if "origin" not in listed and "*" not in listed:
        headers.add(hdrs.VARY, "Origin")


def preflight_handler(
    policy: CorsPolicy, allowlist: Allowlist, chain: Handler
) -> Handler:
    """The OPTIONS handler of /v1: preflights answered here, other calls to `chain`."""

    async def preflight(request: web.Request) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        method = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_METHOD)
        if origin is None or method is None:
            return await chain(request)
        return answer_preflight(request, policy, allowlist, origin, method)

    return preflight


def answer_preflight(
    request: web.Request,
    policy: CorsPolicy,
    allowlist: Allowlist,
    origin: str,
    method: str,
) -> web.Response:
    """204 with what the page may send; 403, or the allowlist's 404/405, otherwise."""
    if not policy.allows_somewhere(origin):
        raise origin_not_allowed()
    path = normalise_path(request.raw_path)
    verdict = allowlist.match(method, path) if path is not None else NOT_FOUND
    if verdict.kind is not MatchKind.ALLOWED:
        refusal = (
            unknown_endpoint()
            if verdict.kind is MatchKind.NOT_FOUND
            else method_not_allowed(method, verdict)
        )
        add_cors_headers(refusal.headers, origin)
        raise refusal
    headers = {
        hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
        hdrs.ACCESS_CONTROL_ALLOW_METHODS: verdict.allow_header,
        hdrs.ACCESS_CONTROL_MAX_AGE: policy.max_age,
        hdrs.VARY: PREFLIGHT_VARY,
    }
    allowed = allowed_request_headers(
        request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS)
    )
    if allowed:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = allowed
    return web.Response(status=204, headers=headers)


def allowed_request_headers(requested: str | None) -> str:
    """Those of the requested header names that are in the safe set, comma-separated."""
    if not requested:
        return ""
    names = (name.strip().lower() for name in requested.split(","))
    return ", ".join(
        name
        for name in dict.fromkeys(names)
        if name in SAFE_REQUEST_HEADERS or name.startswith(SAFE_REQUEST_PREFIXES)
    )
