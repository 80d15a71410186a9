"""TokenStore's request counts, without a loop or a database: reserve, spend or
refund, flush."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.errors import AuthError
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.storage.base import Project, Token, TokenUsage

KEY = bytes(range(32))
NOW = 1_800_000_000.0
VALUE = "wt-unit-test-token-value"


def _store(*, max_requests: int | None = None, request_count: int = 0) -> TokenStore:
    store = TokenStore(TokenHasher(KEY), KeyCipher(KEY), clock=lambda: NOW)
    created = datetime.fromtimestamp(NOW, UTC)
    store.put_project(
        Project(
            "p1",
            "demo",
            "",
            {},
            KeyCipher(KEY).encrypt("sk-upstream"),
            "sk-...eam",
            True,
            created,
            created,
        )
    )
    store.put_token(_token(max_requests=max_requests, request_count=request_count))
    return store


def _token(*, max_requests: int | None = None, request_count: int = 0) -> Token:
    created = datetime.fromtimestamp(NOW, UTC)
    return Token(
        "t1",
        TokenHasher(KEY).hash(VALUE),
        VALUE[-4:],
        "p1",
        created + timedelta(hours=1),
        True,
        request_count,
        max_requests,
        None,
        created,
        None,
    )


def _requests(batch: list[TokenUsage]) -> dict[str, int]:
    return {usage.token_id: usage.requests for usage in batch}


def _call(store: TokenStore) -> None:
    """One call that reached the upstream and ended."""
    store.spend(store.authenticate(VALUE))


def test_each_authentication_reserves_one_request_until_the_quota() -> None:
    store = _store(max_requests=2)
    store.authenticate(VALUE)
    store.authenticate(VALUE)
    with pytest.raises(AuthError) as refused:
        store.authenticate(VALUE)
    assert refused.value.code == "quota_exceeded"


def test_a_reservation_is_flushed_only_once_its_call_is_spent() -> None:
    """A flush while a call is under way (awaiting a fleet lease, its body, the
    upstream) writes nothing for it: the database never shows a call that may yet be
    refused."""
    store = _store(max_requests=2)
    principal = store.authenticate(VALUE)
    assert store.take_usage() == []
    store.spend(principal)
    assert _requests(store.take_usage()) == {"t1": 1}


def test_a_refund_gives_the_reserved_request_back_and_writes_nothing() -> None:
    store = _store(max_requests=1)
    principal = store.authenticate(VALUE)
    assert store.take_usage() == []  # a flush while the call was under way
    store.refund(principal)
    assert store.take_usage() == []
    store.spend(store.authenticate(VALUE))  # the refunded request is available again
    assert _requests(store.take_usage()) == {"t1": 1}


def test_pending_reservations_count_against_the_quota() -> None:
    store = _store(max_requests=2)
    _call(store)
    store.authenticate(VALUE)  # under way
    with pytest.raises(AuthError):
        store.authenticate(VALUE)


def test_taken_counts_still_count_against_the_quota_until_stored() -> None:
    store = _store(max_requests=2)
    _call(store)
    assert _requests(store.take_usage()) == {"t1": 1}
    assert store.take_usage() == []  # handed over once
    _call(store)
    with pytest.raises(AuthError):
        store.authenticate(VALUE)


def test_a_reload_during_a_flush_does_not_lose_the_flushing_counts() -> None:
    store = _store(max_requests=3)
    _call(store)
    _call(store)
    batch = store.take_usage()
    store.put_token(_token(max_requests=3, request_count=0))  # read before the write
    _call(store)
    with pytest.raises(AuthError):
        store.authenticate(VALUE)
    store.usage_stored(batch)
    store.put_token(_token(max_requests=3, request_count=2))  # read after the write
    with pytest.raises(AuthError):
        store.authenticate(VALUE)


def test_a_failed_write_is_counted_again_for_the_next_flush() -> None:
    store = _store()
    _call(store)
    batch = store.take_usage()
    _call(store)
    store.usage_failed(batch)
    assert _requests(store.take_usage()) == {"t1": 2}


def test_counts_of_a_revoked_token_are_kept_for_the_flush() -> None:
    store = _store()
    _call(store)
    store.remove_token("t1")
    with pytest.raises(AuthError):
        store.authenticate(VALUE)
    assert _requests(store.take_usage()) == {"t1": 1}
    assert store.take_usage() == []


def test_a_call_under_way_when_its_token_is_revoked_is_still_written() -> None:
    store = _store()
    principal = store.authenticate(VALUE)
    store.remove_token("t1")
    store.spend(principal)  # the stream finished after the revocation
    assert _requests(store.take_usage()) == {"t1": 1}
