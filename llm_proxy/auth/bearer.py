"""The token of an `Authorization: Bearer <token>` header, read one way everywhere."""

from __future__ import annotations

import hmac


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization` value, or None when there is none.

    The scheme matches in any case (RFC 7235); another scheme, or a bearer scheme
    without a token, is no token.
    """
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer_matches(value: str | None, expected: bytes) -> bool:
    """Whether an `Authorization` value carries `expected`, compared in constant time."""
    token = bearer_token(value)
    return token is not None and hmac.compare_digest(token.encode(), expected)
