"""Errors the proxy generates, always as OpenAI-shaped JSON.

Exception tree::

    ProxyError
    └── ApiError                   (an answer we generate; a web.HTTPException)
        ├── InvalidTokenError      401
        ├── NotAllowedError        403 / 404 / 405
        ├── RequestTooLargeError   413
        ├── IncompleteBodyError    400
        ├── RateLimitedError       429
        └── UpstreamError
            ├── UpstreamUnavailableError  502
            ├── UpstreamTimeoutError      504
            └── CircuitOpenError          503
        └── UpstreamPoolExhaustedError     503 (our overload: not a breaker failure)

Bad settings raise `config.ConfigError` at start (config.py stays free of aiohttp).
Upstream 4xx/5xx answers are not ours: they pass through byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class ProxyError(Exception):
    """Base of every error raised on purpose by llm-proxy."""


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
    """401: missing, malformed, unknown, expired or revoked token."""

    def __init__(self, message: str, code: str = "invalid_api_key") -> None:
        super().__init__(
            401, message, code=code, headers={"WWW-Authenticate": "Bearer"}
        )


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
