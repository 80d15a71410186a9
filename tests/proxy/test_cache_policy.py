"""The response cache's rules as pure functions: Cache-Control both ways, which calls
may be cached and for how long, the entry key, the stored entry's encoding."""

from __future__ import annotations

import pytest

from llm_proxy.proxy.cache import Entry, decode_entry, encode_entry
from llm_proxy.proxy.cache_policy import (
    Directives,
    answer_ttl,
    call_ttl,
    entry_digest,
    entry_key,
    parse_cache_control,
)

HOUR = 3600


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Directives()),
        ("", Directives()),
        ("max-age=60", Directives(max_age=60)),
        ("Max-Age=60", Directives(max_age=60)),
        ('max-age="60"', Directives(max_age=60)),
        ("max-age=0", Directives(max_age=0)),
        ("no-cache", Directives(no_cache=True)),
        ("no-store", Directives(no_store=True)),
        ("no-cache, max-age=5", Directives(no_cache=True, max_age=5)),
        (" max-age=5 ,no-store ", Directives(no_store=True, max_age=5)),
        ("max-age=-1", Directives(no_cache=True)),  # invalid: nothing cached is used
        ("max-age=abc", Directives(no_cache=True)),
        ("max-age=99999999999999999999", Directives(max_age=2**31 - 1)),
        ("private, must-revalidate", Directives()),
    ],
)
def test_request_cache_control_is_parsed(
    value: str | None, expected: Directives
) -> None:
    assert parse_cache_control(value) == expected


def test_models_are_cacheable_for_the_server_maximum_by_default() -> None:
    assert call_ttl("GET", "/v1/models", Directives(), None, HOUR) == HOUR
    assert call_ttl("GET", "/v1/models/gpt-4o", Directives(), None, HOUR) == HOUR
    assert call_ttl("GET", "/v1/models/a/b", Directives(), None, HOUR) is None
    assert call_ttl("GET", "/v1/files", Directives(), None, HOUR) is None


def test_a_post_needs_the_client_or_the_project_to_opt_in() -> None:
    chat = "/v1/chat/completions"
    assert call_ttl("POST", chat, Directives(), None, HOUR) is None
    assert call_ttl("POST", chat, Directives(max_age=60), None, HOUR) == 60
    assert call_ttl("POST", chat, Directives(), 120, HOUR) == 120
    assert call_ttl("POST", chat, Directives(max_age=60), 30, HOUR) == 30
    assert call_ttl("POST", chat, Directives(max_age=9999), None, HOUR) == HOUR
    assert call_ttl("POST", "/v1/embeddings", Directives(max_age=5), None, HOUR) == 5
    # creating things is never replayed, whatever is asked
    assert call_ttl("POST", "/v1/files", Directives(max_age=60), 60, HOUR) is None
    assert call_ttl("POST", "/v1/batches", Directives(max_age=60), 60, HOUR) is None


def test_a_project_ttl_of_zero_turns_the_cache_off_for_it() -> None:
    assert call_ttl("GET", "/v1/models", Directives(), 0, HOUR) is None
    chat = "/v1/chat/completions"
    assert call_ttl("POST", chat, Directives(max_age=60), 0, HOUR) is None


def test_the_upstream_can_forbid_or_shorten_storing() -> None:
    assert answer_ttl(None, 60) == 60
    assert answer_ttl("no-store", 60) == 0
    assert answer_ttl("private", 60) == 0
    assert answer_ttl("no-cache", 60) == 0
    assert answer_ttl("public, max-age=5", 60) == 5
    assert answer_ttl("max-age=500", 60) == 60
    assert answer_ttl("max-age=500, s-maxage=7", 60) == 7
    assert answer_ttl("max-age=junk", 60) == 0


def test_every_part_of_the_call_changes_the_digest() -> None:
    base = {
        "generation": "g1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query": "",
        "varying": ("application/json", "gzip", "application/json", ""),
        "body": b'{"model":"m"}',
    }
    digest = entry_digest(**base)  # type: ignore[arg-type]
    assert len(digest) == 64
    changed = [
        {"generation": "g2"},
        {"method": "GET"},
        {"path": "/v1/completions"},
        {"query": "a=1"},
        {"varying": ("application/json", "identity", "application/json", "")},
        {"body": b'{"model":"m" }'},
    ]
    for change in changed:
        assert entry_digest(**{**base, **change}) != digest, change  # type: ignore[arg-type]
    # parts are framed: moving a byte from one part to the next is another call
    shifted = {**base, "path": "/v1/chat/completions?", "query": "a"}
    assert entry_digest(**shifted) != entry_digest(**{**base, "query": "?a"})  # type: ignore[arg-type]


def test_the_key_names_the_project_and_hides_the_rest() -> None:
    key = entry_key("3f0c-project", "ab" * 32)
    assert key == f"llm-proxy:cache:3f0c-project:{'ab' * 32}"


def test_an_entry_survives_its_encoding_and_garbage_is_refused() -> None:
    headers = (("Content-Type", "application/json"), ("openai-model", "gpt-4o"))
    raw = encode_entry(Entry(200, headers, b'{"a":\n1}', 1700000000.25))
    entry = decode_entry(raw)
    assert entry == Entry(200, headers, b'{"a":\n1}', 1700000000.25)
    assert decode_entry(b"not an entry") is None
    assert decode_entry(b'{"s":200}\n') is None
    assert decode_entry(b"[1,2]\nbody") is None
