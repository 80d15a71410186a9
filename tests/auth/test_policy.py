"""A token's policy compiled for the request path, merged with its project's defaults."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.policy import (
    NEVER_SENT,
    binding_header,
    compile_policy,
    merge_policies,
    model_rule,
)
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.storage.base import Project, Token, TokenPolicy

from .test_token_counts import KEY, NOW, VALUE
from .test_token_counts import _token as plain_token

CREATED = datetime.fromtimestamp(NOW, UTC)


@pytest.mark.parametrize(
    ("key", "header"),
    [
        ("user_id", "X-Proxy-User-Id"),
        ("client", "X-Proxy-Client"),
        ("tenant_2_region", "X-Proxy-Tenant-2-Region"),
    ],
)
def test_a_bound_key_names_its_header(key: str, header: str) -> None:
    assert binding_header(key) == header


def test_a_policy_that_narrows_nothing_compiles_to_none() -> None:
    assert compile_policy(None) is None
    assert compile_policy(TokenPolicy()) is None


def test_exact_names_and_globs_match_like_fnmatchcase() -> None:
    rule = model_rule(("gpt-4o-mini", "gpt-4.1-*", "o[13]"))
    assert rule.pattern is not None
    for model in ("gpt-4o-mini", "gpt-4.1-nano", "o1", "o3"):
        assert rule.allows(model), model
    for model in ("gpt-4o", "GPT-4O-MINI", "gpt-4o-mini-2024", "o2", ""):
        assert not rule.allows(model), model
    exact = model_rule(("gpt-4o-mini",))
    assert exact.pattern is None and exact.names == {"gpt-4o-mini"}


def test_model_rules_are_compiled_once_per_list() -> None:
    assert model_rule(("a-*", "b")) is model_rule(("a-*", "b"))


def test_bindings_hold_their_header_and_value() -> None:
    policy = compile_policy(TokenPolicy(bind={"user_id": "alice", "team": "élan"}))
    assert policy is not None
    team, user = policy.bindings
    assert (user.header, user.expected) == ("X-Proxy-User-Id", "alice")
    assert "alice" not in repr(policy)  # a bound value is not for logs
    # Never written by the rules; if stored by hand, it can match no header.
    assert (team.header, team.expected) == ("X-Proxy-Team", NEVER_SENT)


def test_a_token_can_only_narrow_its_projects_defaults() -> None:
    project = compile_policy(
        TokenPolicy(
            allowed_models=("gpt-4o*",), max_output_tokens_cap=500, allow_streaming=True
        )
    )
    token = compile_policy(
        TokenPolicy(
            bind={"user_id": "alice"},
            allowed_models=("gpt-4o-mini", "o1"),
            max_output_tokens_cap=2000,
            allow_streaming=False,
        )
    )
    merged = merge_policies(project, token)
    assert merged is not None
    assert [b.header for b in merged.bindings] == ["X-Proxy-User-Id"]
    assert merged.max_output_tokens == 500  # the lower cap wins
    assert not merged.allow_streaming  # either one forbids it
    assert merged.allows_model("gpt-4o-mini")
    assert not merged.allows_model("o1")  # in the token's list, not the project's
    assert not merged.allows_model("gpt-4o")  # in the project's, not the token's
    assert merge_policies(None, None) is None
    assert merge_policies(project, None) is project
    assert merge_policies(None, token) is token


def _project(policy: TokenPolicy | None = None) -> Project:
    key = KeyCipher(KEY).encrypt("sk-upstream")
    return Project(
        "p1", "demo", "", {}, key, "sk-...eam", True, CREATED, CREATED, policy=policy
    )


def _token(policy: TokenPolicy | None = None, change_seq: int = 1) -> Token:
    return replace(plain_token(), policy=policy, change_seq=change_seq)


def test_the_principal_carries_the_merged_policy_and_follows_changes() -> None:
    store = TokenStore(TokenHasher(KEY), KeyCipher(KEY), clock=lambda: NOW)
    store.put_project(_project())
    store.put_token(_token())
    assert store.authenticate(VALUE).policy is None
    store.put_token(_token(TokenPolicy(allowed_models=("gpt-4o-mini",)), 2))
    first = store.authenticate(VALUE).policy
    assert first is not None and first.allows_model("gpt-4o-mini")
    assert store.authenticate(VALUE).policy is first  # built once, not per call
    store.put_project(_project(TokenPolicy(max_output_tokens_cap=100)))
    merged = store.authenticate(VALUE).policy
    assert merged is not None and merged.max_output_tokens == 100
    assert merged.allows_model("gpt-4o-mini") and not merged.allows_model("o1")
    store.put_project(replace(_project(), max_concurrent=3))  # defaults cleared
    cleared = store.authenticate(VALUE).policy
    assert cleared is not None and cleared.max_output_tokens is None
