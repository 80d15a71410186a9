"""The origins every active project allows (for preflights, which carry no token) and
each principal's origin rule, kept by the token table as projects change."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from llm_proxy.auth.crypto import KeyCipher, TokenHasher
from llm_proxy.auth.origin_index import OriginIndex
from llm_proxy.auth.tokens import TokenStore
from llm_proxy.origins import OriginRule
from llm_proxy.storage.base import Deletion, Project, Token

KEY = bytes(range(32))
NOW = 1_800_000_000.0
CREATED = datetime.fromtimestamp(NOW, UTC)
VALUE = "wt-origin-index-token-value"
APP = "https://app.example.com"


def project(project_id: str = "p1", **fields: object) -> Project:
    base = Project(
        project_id,
        f"name-{project_id}",
        "",
        {},
        KeyCipher(KEY).encrypt("sk-upstream"),
        "sk-...eam",
        True,
        CREATED,
        CREATED,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def token(project_id: str = "p1") -> Token:
    return Token(
        "t1",
        TokenHasher(KEY).hash(VALUE),
        VALUE[-4:],
        project_id,
        CREATED + timedelta(hours=1),
        True,
        0,
        None,
        None,
        CREATED,
        None,
    )


def store() -> TokenStore:
    return TokenStore(TokenHasher(KEY), KeyCipher(KEY), clock=lambda: NOW)


def test_the_index_counts_each_origin_once_per_project_listing_it() -> None:
    index = OriginIndex()
    index.set("p1", (APP, "https://*.example.org"))
    index.set("p2", (APP,))
    assert index.allows(APP) and index.allows("https://a.example.org")
    index.set("p1", ())
    assert index.allows(APP) and not index.allows("https://a.example.org")
    index.discard("p2")
    assert not index.allows(APP)
    assert len(index) == 0
    index.discard("never-listed")


def test_the_store_indexes_active_projects_origins_as_they_change() -> None:
    tokens = store()
    index = tokens.origin_index
    tokens.put_project(project(allowed_origins=(APP,)))
    assert index.allows(APP)
    tokens.put_project(project(allowed_origins=(APP,), is_active=False))
    assert not index.allows(APP)
    tokens.put_project(project(allowed_origins=("https://other.example",)))
    assert index.allows("https://other.example") and not index.allows(APP)
    tokens.put_project(
        project(allowed_origins=("https://other.example",), encrypted_api_key="x")
    )
    assert not index.allows("https://other.example")  # undecryptable: dropped
    tokens.put_project(project(allowed_origins=(APP,)))
    tokens.apply_deletions([Deletion("project", "p1")])
    assert not index.allows(APP)


def test_a_principal_carries_its_projects_origin_rule() -> None:
    tokens = store()
    tokens.put_project(project())
    tokens.put_token(token())
    assert tokens.authenticate(VALUE).origins is None
    tokens.put_project(project(allowed_origins=(APP,), require_origin=True))
    rule = tokens.authenticate(VALUE).origins
    assert rule == OriginRule((APP,), require_origin=True)
    tokens.put_project(project(require_origin=True))
    assert tokens.authenticate(VALUE).origins == OriginRule((), require_origin=True)
    tokens.put_project(project())
    assert tokens.authenticate(VALUE).origins is None
