"""What went wrong, free of HTTP: the base of every error llm-proxy raises on purpose.

Domain errors (auth, the management rules) carry a `kind`, a machine `code` and a
message; `errors.api_error` turns them into HTTP answers at the edge. This module
imports nothing of the project and no aiohttp, so every layer may raise them; the
whole tree is drawn in `errors.py`.
"""

from __future__ import annotations

from enum import Enum


class ProxyError(Exception):
    """Base of every error raised on purpose by llm-proxy."""


class ErrorKind(Enum):
    """What kind of thing went wrong, in the terms of the rules."""

    INVALID = "invalid"  # the input breaks a rule
    UNAUTHENTICATED = "unauthenticated"  # no credential, or not a valid one
    FORBIDDEN = "forbidden"  # known, but not allowed now (an inactive project)
    NOT_FOUND = "not_found"  # no such project or token
    CONFLICT = "conflict"  # clashes with what exists (a name taken)
    QUOTA_SPENT = "quota_spent"  # a lifetime allowance used up: it never comes back


class DomainError(ProxyError):
    """A rule refused: its `kind`, a machine `code`, a message for people, and the
    input at fault (`param`) when there is one."""

    kind: ErrorKind = ErrorKind.INVALID
    code: str = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        if code is not None:
            self.code = code
        self.param = param
