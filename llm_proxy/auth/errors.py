"""Why a token or another credential is refused (`AuthError`), free of HTTP.

Apart from the token table, so the layers that check other credentials (/manage,
/metrics) raise the same error without loading the table or storage's records.
"""

from __future__ import annotations

from ..domain_errors import DomainError, ErrorKind


class AuthError(DomainError):
    """Why a token was refused; unless said otherwise, it is not a valid one."""

    kind = ErrorKind.UNAUTHENTICATED
    code = "invalid_api_key"


def quota_spent() -> AuthError:
    """The refusal of a token that has used all of its requests (here or fleet-wide)."""
    return AuthError(
        "This token has used all of its requests.",
        kind=ErrorKind.QUOTA_SPENT,
        code="quota_exceeded",
    )
