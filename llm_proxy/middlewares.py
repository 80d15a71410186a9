"""HTTP adapters for cross-cutting concerns, each a factory returning a middleware.

Root chain: `json_errors` (every error we generate is OpenAI-shaped JSON). The `/v1`
chain (allowlist, token auth, rate limit, circuit breaker) is added by the proxy.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .errors import ApiError

log = logging.getLogger(__name__)

_MESSAGES = {
    404: ("Unknown path.", "not_found"),
    405: ("Method not allowed for this path.", "method_not_allowed"),
    413: ("The request body is too large.", "request_too_large"),
}


def json_errors_middleware() -> Middleware:
    """aiohttp's plain-text errors and unexpected exceptions become OpenAI JSON."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError:
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            raise _as_api_error(exc) from None
        except Exception:
            log.exception("unhandled error for %s %s", request.method, request.path)
            raise ApiError(
                500, "Internal error in llm-proxy.", type="api_error", code="internal_error"
            ) from None

    return json_errors


def _as_api_error(exc: web.HTTPException) -> ApiError:
    message, code = _MESSAGES.get(exc.status, (exc.reason, "http_error"))
    headers = {}
    if "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return ApiError(exc.status, message, code=code, headers=headers)
