"""Browser origins: checking allowed-origin entries, and matching a request's `Origin`.

An entry is an exact origin (`scheme://host[:port]`, http or https, no path) or a
subdomain wildcard (`https://*.example.com`: one or more labels before `example.com`,
never `example.com` itself). Entries are kept in the form browsers send (lower case,
no default port), so a request's `Origin` is compared as it came: one set lookup, and
for wildcards one lookup per label of its host. Imports nothing of the project, so
the settings, the management rules, the token table and the proxy share it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

# Entries per project (and in CORS_ALLOWED_ORIGINS): a bound, and more than a site needs.
MAX_ORIGINS: Final = 32
MAX_ORIGIN_CHARS: Final = 300
DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
WILDCARD: Final = "*."
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


class OriginError(ValueError):
    """An allowed-origin entry is malformed; the message says what is wrong."""


def parse_origin(text: str) -> str:
    """The canonical form of an allowed-origin entry; `OriginError` saying why not."""
    raw = text.strip()
    if raw == "*" or raw.endswith("://*"):
        raise OriginError("'*' is not accepted: list each origin, or *.domain")
    if len(raw) > MAX_ORIGIN_CHARS:
        raise OriginError(f"an origin has at most {MAX_ORIGIN_CHARS} characters")
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise OriginError(f"{raw!r} must start with http:// or https://")
    if any(mark in rest for mark in "/?#"):
        raise OriginError(f"{raw!r} must have no path (scheme://host[:port])")
    if "@" in rest:
        raise OriginError(f"{raw!r} must have no user name")
    host, port = _host_and_port(raw, rest)
    port = "" if port == DEFAULT_PORTS[scheme] else port
    return f"{scheme}://{_checked_host(raw, host)}{':' + port if port else ''}"


def parse_origins(texts: Iterable[str]) -> tuple[str, ...]:
    """Canonical entries in the given order, without duplicates, at most MAX_ORIGINS."""
    entries = tuple(dict.fromkeys(parse_origin(text) for text in texts))
    if len(entries) > MAX_ORIGINS:
        raise OriginError(f"at most {MAX_ORIGINS} origins, got {len(entries)}")
    return entries


def _host_and_port(raw: str, rest: str) -> tuple[str, str]:
    """The host (an IPv6 one in brackets) and the port text ('' when none)."""
    if rest.startswith("["):
        host, bracket, after = rest.partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise OriginError(f"{raw!r} has a malformed host")
        host, port = host + "]", after[1:]
        has_port = bool(after)
    else:
        host, colon, port = rest.partition(":")
        has_port = bool(colon)
    if has_port and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        raise OriginError(f"{raw!r} has a bad port (1 to 65535)")
    return host.lower(), port.lstrip("0") if has_port else ""


def _checked_host(raw: str, host: str) -> str:
    """A DNS name, IPv4 address, [IPv6] address or `*.` wildcard, canonical."""
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise OriginError(f"{raw!r} has a malformed host") from None
    wildcard = host.startswith(WILDCARD)
    name = host[len(WILDCARD) :] if wildcard else host
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise OriginError(f"{raw!r} has a malformed host (ASCII letters, digits, '-')")
    if all(label.isdigit() for label in labels):
        _check_ipv4(raw, name, wildcard)
    elif wildcard and len(labels) < 2:
        raise OriginError(f"{raw!r}: a wildcard needs a domain of two labels or more")
    return host


def _check_ipv4(raw: str, name: str, wildcard: bool) -> None:
    if wildcard:
        raise OriginError(f"{raw!r}: a wildcard needs a domain of two labels or more")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        raise OriginError(f"{raw!r} has a malformed host") from None


def entry_key(entry: str) -> tuple[bool, str]:
    """(is a wildcard, key): the key of `https://*.example.com` is `https://example.com`."""
    scheme, _, host = entry.partition("://")
    if host.startswith(WILDCARD):
        return True, f"{scheme}://{host[len(WILDCARD) :]}"
    return False, entry


def wildcard_keys(origin: str) -> Iterator[str]:
    """The wildcard keys a request's origin falls under: its host minus one or more
    leading labels (each label well formed), with its scheme and port."""
    scheme, sep, rest = origin.partition("://")
    if not sep or rest.startswith("["):
        return
    host, colon, port = rest.partition(":")
    labels = host.split(".")
    if len(labels) < 3 or not all(_LABEL.fullmatch(label) for label in labels):
        return
    for start in range(1, len(labels) - 1):
        yield f"{scheme}://{'.'.join(labels[start:])}{colon}{port}"


def matches(origin: str, exact: Collection[str], wildcards: Collection[str]) -> bool:
    """Whether `origin` is one of `exact` or falls under one of the `wildcards` keys."""
    if origin in exact:
        return True
    return bool(wildcards) and any(key in wildcards for key in wildcard_keys(origin))


class OriginSet:
    """Canonical entries compiled for matching: exact ones in a set, wildcards by key."""

    __slots__ = ("_exact", "_wildcards", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        keys = [entry_key(entry) for entry in self.entries]
        self._exact = frozenset(key for wild, key in keys if not wild)
        self._wildcards = frozenset(key for wild, key in keys if wild)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, origin: str) -> bool:
        """Whether a request's `Origin` header value is allowed."""
        return matches(origin, self._exact, self._wildcards)


@dataclass(frozen=True, slots=True)
class OriginRule:
    """A project's origin rule: its own list (empty: the server default applies) and
    whether its tokens need an `Origin` at all (browser-only tokens)."""

    entries: tuple[str, ...]
    require_origin: bool
    _set: OriginSet = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", OriginSet(self.entries))

    @classmethod
    def of(cls, entries: tuple[str, ...], *, require_origin: bool) -> OriginRule | None:
        """The rule of a project; None when it has neither a list nor the requirement."""
        if not entries and not require_origin:
            return None
        return cls(entries, require_origin)

    def allows(self, origin: str, default: OriginSet) -> bool:
        """Whether this project's tokens may be used from `origin`."""
        return self.effective(default).allows(origin)

    def effective(self, default: OriginSet) -> OriginSet:
        """The origins that apply: this project's own, else the server default."""
        return self._set if self.entries else default
