"""Parsers of the settings whose values have a form of their own: addresses, keys, URLs."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from typing import Final

from yarl import URL

from ..dsn import parse_database_url, parse_redis_url
from .model import ConfigError, IpNetwork

MIN_MANAGEMENT_TOKEN_CHARS: Final = 16
ENCRYPTION_KEY_BYTES: Final = 32


def parse_listen_addr(value: str, name: str = "LISTEN_ADDR") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` → (host, port); no host = all interfaces."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"{name} must look like ':8080' or '127.0.0.1:8080', got {value!r}"
        )
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def parse_encryption_key(value: str | None) -> bytes | None:
    """ENCRYPTION_KEY is base64 (standard or URL-safe) of exactly 32 bytes."""
    if value is None:
        return None
    padded = value + "=" * (-len(value) % 4)
    key = b""
    for altchars in (None, b"-_"):
        try:
            key = base64.b64decode(padded, altchars=altchars, validate=True)
            break
        except (binascii.Error, ValueError):
            continue
    if len(key) != ENCRYPTION_KEY_BYTES:
        raise ConfigError(
            f"ENCRYPTION_KEY must be base64 of {ENCRYPTION_KEY_BYTES} random bytes "
            f"(decoded {len(key)} bytes); value not shown"
        )
    return key


def management_token(value: str | None) -> str:
    """MANAGEMENT_TOKEN: required, at least MIN_MANAGEMENT_TOKEN_CHARS long."""
    if value is None:
        raise ConfigError(
            f"MANAGEMENT_TOKEN is required (at least {MIN_MANAGEMENT_TOKEN_CHARS} "
            "characters)"
        )
    if len(value) < MIN_MANAGEMENT_TOKEN_CHARS:
        raise ConfigError(
            f"MANAGEMENT_TOKEN must be at least {MIN_MANAGEMENT_TOKEN_CHARS} "
            f"characters, got {len(value)}"
        )
    return value


def database_url(value: str) -> str:
    """DATABASE_URL, checked by the one parser of its forms."""
    try:
        return parse_database_url(value).url
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def redis_url(value: str | None) -> str | None:
    """REDIS_URL, checked by the one parser of its forms; None when unset."""
    try:
        return None if value is None else parse_redis_url(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def upstream_url(value: str) -> URL:
    """OPENAI_API_URL: http(s) with a host, no query; a trailing / is dropped."""
    url = URL(value)
    if url.scheme not in {"http", "https"} or not url.host or url.query_string:
        raise ConfigError(
            f"OPENAI_API_URL must be an http(s) URL without a query, got {value!r}"
        )
    return url.with_path(url.path.rstrip("/"))


def trusted_proxies(value: str | None) -> tuple[IpNetwork, ...]:
    """TRUSTED_PROXIES: comma-separated addresses or CIDR networks."""
    networks: list[IpNetwork] = []
    for item in (value or "").split(","):
        text = item.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(
                "TRUSTED_PROXIES must be comma-separated addresses or networks "
                f"(127.0.0.1, 10.0.0.0/8), got {text!r}"
            ) from None
    return tuple(networks)


def workers(value: str | None, default: int) -> int:
    """WORKERS: a count >= 1, or `auto` for the CPU count."""
    if value is None:
        return default
    if value.lower() == "auto":
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"WORKERS (--workers) must be a number >= 1 or auto, got {value!r}"
        )
    return int(value)
