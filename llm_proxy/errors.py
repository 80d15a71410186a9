"""The HTTP edge of the error model: every error answer we make, as OpenAI JSON.

Exception tree (the domain errors, free of HTTP, are in `domain_errors.py` and the
layers that raise them)::

    ProxyError
    ├── ApiError                   (an answer we generate; a web.HTTPException)
    │   ├── InvalidTokenError      401
    │   ├── NotAllowedError        403 / 404 / 405
    │   ├── RequestTooLargeError   413
    │   ├── IncompleteBodyError    400
    │   ├── RateLimitedError       429
    │   ├── UpstreamError
    │   │   ├── UpstreamUnavailableError  502
    │   │   ├── UpstreamTimeoutError      504
    │   │   └── CircuitOpenError          503
    │   └── UpstreamPoolExhaustedError    503 (our overload: not a breaker failure)
    ├── DomainError                (a rule refused: kind, code, message, param)
    │   ├── auth.errors.AuthError          a token or credential refused
    │   ├── management.service.ServiceError  NotFound, Conflict, Forbidden
    │   └── management.policy.PolicyError    a policy field breaks a rule
    ├── config.ConfigError, proxy.allowlist_file.AllowlistConfigError  bad settings
    ├── auth.crypto.DecryptionError
    ├── management.service.KeyMismatchError  ENCRYPTION_KEY is not the data's key
    ├── storage.RepositoryError    DuplicateNameError, MigrationError, RejectedRowsError
    ├── dispatchers.base.DeliveryError       a batch of events not delivered
    ├── server.PidFileError, management.client.ManageApiError
    └── cli.base.CliError, cli.chat.ChatError, devtools.bench.BenchError

`ANSWERS` is the one table from a domain error's kind to its status and OpenAI type;
`api_error` applies it for the /v1 chain, `/manage` (through `json_errors_middleware`),
/metrics and the admin pages. Upstream 4xx/5xx answers are not ours: they pass
through byte for byte.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .domain_errors import DomainError, ErrorKind, ProxyError

log = logging.getLogger(__name__)


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class ApiError(web.HTTPException, ProxyError):
    """An error answer in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status_code = status
        self.message = message
        self.error_type = type
        self.code = code
        self.param = param
        super().__init__(
            headers=headers,
            text=error_body(message, type=type, code=code, param=param).decode(),
            content_type="application/json",
        )

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.message}"


class InvalidTokenError(ApiError):
    """401: a missing, malformed, unknown, expired or revoked token (see ANSWERS)."""


class NotAllowedError(ApiError):
    """403/404/405: the request is not allowed here."""


class RequestTooLargeError(ApiError):
    """413: a body over MAX_REQUEST_BYTES, declared or counted as it arrives.

    The connection is closed after the answer: the rest of a refused upload is not
    worth reading (aiohttp would otherwise drain it for up to ten seconds).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"The request body is larger than the {limit} bytes this proxy accepts.",
            code="request_too_large",
        )
        self.force_close()


class IncompleteBodyError(ApiError):
    """400: the client's body ended before its framing said it would."""

    def __init__(self) -> None:
        super().__init__(
            400,
            "The request body ended before its declared end.",
            code="incomplete_request_body",
        )
        self.force_close()


class RateLimitedError(ApiError):
    """429 with Retry-After."""

    def __init__(
        self, message: str, *, retry_after_s: float, code: str, extra: Mapping[str, str]
    ) -> None:
        headers = {"Retry-After": retry_after(retry_after_s), **extra}
        super().__init__(
            429, message, type="rate_limit_error", code=code, headers=headers
        )


class UpstreamError(ApiError):
    """The upstream could not give an answer."""


class UpstreamUnavailableError(UpstreamError):
    """502: connection refused, reset, DNS failure, malformed answer."""

    def __init__(self, message: str = "The upstream API could not be reached.") -> None:
        super().__init__(502, message, type="api_error", code="upstream_unavailable")


class UpstreamTimeoutError(UpstreamError):
    """504: the upstream did not answer in time."""

    def __init__(
        self, message: str = "The upstream API did not answer in time."
    ) -> None:
        super().__init__(504, message, type="api_error", code="upstream_timeout")


class CircuitOpenError(UpstreamError):
    """503 while the circuit breaker is open."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            503,
            "The upstream API is failing; requests are paused for a moment.",
            type="api_error",
            code="circuit_open",
            headers={"Retry-After": retry_after(retry_after_s)},
        )


class UpstreamPoolExhaustedError(ApiError):
    """503: no upstream connection came free within UPSTREAM_POOL_TIMEOUT.

    Not an `UpstreamError`: a full pool is the proxy's own overload, so the circuit
    breaker does not count it against the upstream.
    """

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__(
            503,
            "Every upstream connection is busy; retry in a moment.",
            type="api_error",
            code="upstream_pool_exhausted",
            headers={"Retry-After": retry_after(retry_after_s)},
        )


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """The JSON bytes of an OpenAI-shaped error."""
    error: dict[str, Any] = {
        "message": message,
        "type": type,
        "param": param,
        "code": code,
    }
    return orjson.dumps({"error": error})


# -- domain errors: one table from what went wrong to how we answer ------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """How the HTTP edge answers one kind of domain error.

    `error_class` is the answer's class, which a /v1 call's event names.
    """

    status: int
    error_class: type[ApiError]
    type: str = "invalid_request_error"
    headers: Mapping[str, str] = field(default_factory=dict)


ANSWERS: Final[Mapping[ErrorKind, Answer]] = {
    ErrorKind.INVALID: Answer(400, ApiError),
    ErrorKind.UNAUTHENTICATED: Answer(
        401, InvalidTokenError, headers={"WWW-Authenticate": "Bearer"}
    ),
    ErrorKind.FORBIDDEN: Answer(403, NotAllowedError),
    ErrorKind.NOT_FOUND: Answer(404, NotAllowedError),
    ErrorKind.CONFLICT: Answer(409, ApiError),
    # A spent lifetime quota never comes back: OpenAI's type for a spent quota, which
    # clients treat as not worth a retry, and no Retry-After to promise one.
    ErrorKind.QUOTA_SPENT: Answer(429, ApiError, type="insufficient_quota"),
}


def http_status(error: DomainError) -> int:
    """The status a domain error is answered with."""
    return ANSWERS[error.kind].status


def api_error(error: DomainError) -> ApiError:
    """The OpenAI-shaped answer to a domain error."""
    answer = ANSWERS[error.kind]
    return answer.error_class(
        answer.status,
        error.message,
        type=answer.type,
        code=error.code,
        param=error.param,
        headers=answer.headers,
    )


# -- aiohttp's own errors and the unexpected ----------------------------------------

_MESSAGES = {
    404: ("Unknown path.", "not_found"),
    405: ("Method not allowed for this path.", "method_not_allowed"),
    413: ("The request body is too large.", "request_too_large"),
}


def as_api_error(exc: web.HTTPException) -> ApiError:
    """aiohttp's plain-text error (a 404 route, a 413 body) in OpenAI's shape."""
    message, code = _MESSAGES.get(exc.status, (exc.reason, "http_error"))
    headers = {}
    if "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return ApiError(exc.status, message, code=code, headers=headers)


def internal_error() -> ApiError:
    """The 500 answer to an exception nobody handled (it is logged, not shown)."""
    return ApiError(
        500, "Internal error in llm-proxy.", type="api_error", code="internal_error"
    )


def json_errors_middleware() -> Middleware:
    """The root middleware: domain errors, aiohttp's plain-text errors and unexpected
    exceptions become OpenAI JSON."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError:
            raise
        except DomainError as exc:
            raise api_error(exc) from None
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            raise as_api_error(exc) from None
        except Exception:
            log.exception("unhandled error for %s %s", request.method, request.path)
            raise internal_error() from None

    return json_errors
