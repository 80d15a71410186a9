"""The error model: one base class, domain errors free of HTTP, one translation table."""

from __future__ import annotations

import pytest

from llm_proxy.auth.crypto import DecryptionError
from llm_proxy.auth.errors import AuthError, quota_spent
from llm_proxy.cli.base import CliError
from llm_proxy.cli.chat import ChatError
from llm_proxy.config import ConfigError
from llm_proxy.devtools.bench import BenchError
from llm_proxy.dispatchers.base import DeliveryError
from llm_proxy.domain_errors import DomainError, ErrorKind, ProxyError
from llm_proxy.errors import ANSWERS, ApiError, api_error, error_body, http_status
from llm_proxy.management.client import ManageApiError
from llm_proxy.management.policy import PolicyError
from llm_proxy.management.service import (
    Conflict,
    Forbidden,
    KeyMismatchError,
    NotFound,
    ServiceError,
)
from llm_proxy.proxy.allowlist_file import AllowlistConfigError
from llm_proxy.server import PidFileError
from llm_proxy.storage import RepositoryError

# (domain error, status, OpenAI type, code, param, the answer's class, its headers)
CASES = [
    (
        ServiceError("name must be 1 to 200 characters.", param="name"),
        400,
        "invalid_request_error",
        "invalid_request",
        "name",
        "ApiError",
        {},
    ),
    (
        NotFound("No project with id 'x'.", param="project_id"),
        404,
        "invalid_request_error",
        "not_found",
        "project_id",
        "NotAllowedError",
        {},
    ),
    (
        Conflict("A project named 'demo' already exists.", param="name"),
        409,
        "invalid_request_error",
        "conflict",
        "name",
        "ApiError",
        {},
    ),
    (
        Forbidden("Cannot create tokens for an inactive project.", param="project_id"),
        403,
        "invalid_request_error",
        "project_inactive",
        "project_id",
        "NotAllowedError",
        {},
    ),
    (
        AuthError("Invalid or revoked token."),
        401,
        "invalid_request_error",
        "invalid_api_key",
        None,
        "InvalidTokenError",
        {"WWW-Authenticate": "Bearer"},
    ),
    (
        AuthError("This token has expired.", code="token_expired"),
        401,
        "invalid_request_error",
        "token_expired",
        None,
        "InvalidTokenError",
        {"WWW-Authenticate": "Bearer"},
    ),
    (
        AuthError(
            "The token's project is inactive.",
            kind=ErrorKind.FORBIDDEN,
            code="project_inactive",
        ),
        403,
        "invalid_request_error",
        "project_inactive",
        None,
        "NotAllowedError",
        {},
    ),
    (
        quota_spent(),
        429,
        "insufficient_quota",
        "quota_exceeded",
        None,
        "ApiError",
        {},
    ),
]


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code", "param", "answer_class", "headers"),
    CASES,
    ids=[f"{type(case[0]).__name__}-{case[3]}" for case in CASES],
)
def test_each_domain_error_gets_its_status_type_and_code(
    error: DomainError,
    status: int,
    error_type: str,
    code: str,
    param: str | None,
    answer_class: str,
    headers: dict[str, str],
) -> None:
    answer = api_error(error)
    assert http_status(error) == answer.status == status
    assert answer.body == error_body(
        error.message, type=error_type, code=code, param=param
    )
    assert answer.content_type == "application/json"
    assert type(answer).__name__ == answer_class
    assert {name: answer.headers[name] for name in headers} == headers
    assert "Retry-After" not in answer.headers


def test_the_table_answers_every_kind_and_a_401_names_its_scheme() -> None:
    assert set(ANSWERS) == set(ErrorKind)
    for kind, answer in ANSWERS.items():
        assert ("WWW-Authenticate" in answer.headers) == (
            kind is ErrorKind.UNAUTHENTICATED
        )


def test_a_spent_quota_promises_no_retry() -> None:
    answer = api_error(quota_spent())
    assert answer.body == (
        b'{"error":{"message":"This token has used all of its requests.",'
        b'"type":"insufficient_quota","param":null,"code":"quota_exceeded"}}'
    )


def test_each_answer_is_a_new_exception_with_headers_of_its_own() -> None:
    first = api_error(AuthError("Invalid or revoked token."))
    first.headers["X-Request-ID"] = "one"
    second = api_error(AuthError("Invalid or revoked token."))
    assert "X-Request-ID" not in second.headers
    assert "X-Request-ID" not in ANSWERS[ErrorKind.UNAUTHENTICATED].headers


def test_domain_errors_say_what_went_wrong_not_how_to_answer() -> None:
    for error, *_ in CASES:
        assert isinstance(error, DomainError) and not isinstance(error, ApiError)
        assert not hasattr(error, "status") and not hasattr(error, "status_code")
        assert error.kind in ErrorKind and error.code and str(error) == error.message


@pytest.mark.parametrize(
    "error_class",
    [
        ApiError,
        DomainError,
        AuthError,
        ServiceError,
        PolicyError,
        KeyMismatchError,
        DecryptionError,
        ConfigError,
        AllowlistConfigError,
        RepositoryError,
        DeliveryError,
        ManageApiError,
        PidFileError,
        CliError,
        ChatError,
        BenchError,
    ],
)
def test_every_deliberate_error_is_a_proxy_error(error_class: type) -> None:
    assert issubclass(error_class, ProxyError)
