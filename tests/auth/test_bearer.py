"""Reading `Authorization: Bearer <token>`: one reader for /v1, /manage and /metrics."""

from __future__ import annotations

import pytest

from llm_proxy.auth.bearer import bearer_matches, bearer_token


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer tok-1", "tok-1"),
        ("bearer tok-1", "tok-1"),
        ("BEARER tok-1", "tok-1"),
        ("Bearer   tok-1  ", "tok-1"),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", None),
        ("Bearer    ", None),
        ("Bearertok-1", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_reads_the_scheme_in_any_case(
    value: str | None, token: str | None
) -> None:
    assert bearer_token(value) == token


def test_bearer_matches_only_the_expected_token() -> None:
    assert bearer_matches("bearer s3cret", b"s3cret")
    assert not bearer_matches("Bearer s3cret2", b"s3cret")
    assert not bearer_matches("Basic s3cret", b"s3cret")
    assert not bearer_matches(None, b"s3cret")
