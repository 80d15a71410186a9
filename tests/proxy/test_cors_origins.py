"""Allowed-origin entries: what is accepted at set time, and what a request's Origin
matches (exact entries, `https://*.example.com` subdomain wildcards)."""

from __future__ import annotations

import re

import pytest

from llm_proxy.origins import (
    MAX_ORIGINS,
    OriginError,
    OriginRule,
    OriginSet,
    parse_origin,
    parse_origins,
)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://app.example.com:80", "http://app.example.com"),
        ("http://localhost:5173", "http://localhost:5173"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("http://[0:0:0:0:0:0:0:1]", "http://[::1]"),
        ("https://*.example.com", "https://*.example.com"),
        ("https://*.Example.com:8443", "https://*.example.com:8443"),
        ("  https://a.example.com  ", "https://a.example.com"),
    ],
)
def test_origin_entries_are_kept_in_the_form_browsers_send(
    given: str, canonical: str
) -> None:
    assert parse_origin(given) == canonical


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("*", "'*'"),
        ("null", "http:// or https://"),
        ("ftp://example.com", "http:// or https://"),
        ("example.com", "http:// or https://"),
        ("https://example.com/", "no path"),
        ("https://example.com/app", "no path"),
        ("https://example.com?x=1", "no path"),
        ("https://example.com#top", "no path"),
        ("https://user@example.com", "user"),
        ("https://", "host"),
        ("https://exa mple.com", "host"),
        ("https://exa_mple.com", "host"),
        ("https://-bad.example.com", "host"),
        ("https://example..com", "host"),
        ("https://example.com:0", "port"),
        ("https://example.com:65536", "port"),
        ("https://example.com:", "port"),
        ("https://example.com:8x", "port"),
        ("https://*.com", "two labels"),
        ("https://*", "'*'"),
        ("https://a.*.example.com", "host"),
        ("https://*example.com", "host"),
        ("https://*.*.example.com", "host"),
        ("https://*.127.0.0.1", "two labels"),
        ("http://[::1", "host"),
        ("http://[zz::1]", "host"),
        ("http://999.1.1.1", "host"),
        ("https://exämple.com", "host"),
        ("https://example.com\x00", "host"),
        ("https://" + "a" * 64 + ".com", "host"),
    ],
)
def test_malformed_origin_entries_are_refused_saying_why(
    given: str, reason: str
) -> None:
    with pytest.raises(OriginError, match=re.escape(reason)):
        parse_origin(given)


def test_an_origin_list_is_deduplicated_in_order_and_bounded() -> None:
    given = ["https://b.example", "https://a.example", "HTTPS://B.EXAMPLE"]
    assert parse_origins(given) == ("https://b.example", "https://a.example")
    many = [f"https://host{n}.example" for n in range(MAX_ORIGINS)]
    assert len(parse_origins(many)) == MAX_ORIGINS
    with pytest.raises(OriginError, match=f"at most {MAX_ORIGINS}"):
        parse_origins([*many, "https://one-more.example"])


def test_an_exact_entry_matches_only_that_origin() -> None:
    allowed = OriginSet(["https://app.example.com", "http://localhost:5173"])
    assert allowed.allows("https://app.example.com")
    assert allowed.allows("http://localhost:5173")
    assert not allowed.allows("http://app.example.com")
    assert not allowed.allows("https://app.example.com:8443")
    assert not allowed.allows("http://localhost:5174")
    assert not allowed.allows("https://evil.app.example.com")
    assert not allowed.allows("null")
    assert not allowed.allows("")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://x-1.example.com", True),
        ("https://example.com", False),
        ("https://evil-example.com", False),
        ("https://a.evil-example.com", False),
        ("https://example.com.evil.net", False),
        ("http://a.example.com", False),
        ("https://a.example.com:8443", False),
        ("https://.example.com", False),
        ("https://a..example.com", False),
        ("https://A.example.com", False),
        ("https://a_b.example.com", False),
        ("https://a.example.com/", False),
        ("https://[::1].example.com", False),
        ("null", False),
    ],
)
def test_a_wildcard_matches_one_or_more_subdomain_labels_only(
    origin: str, allowed: bool
) -> None:
    assert OriginSet(["https://*.example.com"]).allows(origin) is allowed


def test_a_wildcard_keeps_its_port() -> None:
    allowed = OriginSet(["https://*.example.com:8443"])
    assert allowed.allows("https://a.example.com:8443")
    assert not allowed.allows("https://a.example.com")


def test_an_empty_set_allows_nothing() -> None:
    assert not OriginSet([]).allows("https://a.example.com")
    assert not OriginSet([])


def test_a_rule_uses_its_own_list_or_else_the_server_default() -> None:
    default = OriginSet(["https://default.example"])
    listed = OriginRule(("https://own.example",), require_origin=False)
    assert listed.allows("https://own.example", default)
    assert not listed.allows("https://default.example", default)
    unlisted = OriginRule((), require_origin=True)
    assert unlisted.allows("https://default.example", default)
    assert not unlisted.allows("https://own.example", default)


def test_a_rule_is_only_made_for_a_project_that_has_one() -> None:
    assert OriginRule.of((), require_origin=False) is None
    rule = OriginRule.of(("https://a.example",), require_origin=False)
    assert rule == OriginRule(("https://a.example",), require_origin=False)
    assert OriginRule.of((), require_origin=True) == OriginRule((), True)
