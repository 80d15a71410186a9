"""The project options of `manage project create|update`: origins (CORS) and cache.

They become the API's `allowed_origins`, `require_origin` and `cache_ttl_seconds`
fields; the rules are the server's, whose 400 names the field at fault.
"""

from __future__ import annotations

from typing import Any

import click

from ..management.service import MAX_CACHE_TTL_SECONDS
from .base import F


def origin_options(function: F) -> F:
    """`--allowed-origin URL` (repeatable) and `--require-origin/--no-require-origin`."""
    options = [
        click.option(
            "--allowed-origin",
            "allowed_origins",
            multiple=True,
            metavar="URL",
            help="An origin whose pages may use the project's tokens "
            "(https://app.example.com, https://*.example.com); repeatable.",
        ),
        click.option(
            "--require-origin/--no-require-origin",
            default=None,
            help="Refuse the project's tokens without an Origin header.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def origin_fields(
    origins: tuple[str, ...], clear: bool, require_origin: bool | None
) -> dict[str, Any]:
    """The body fields the origin options give."""
    if clear and origins:
        raise click.UsageError(
            "--clear-allowed-origins and --allowed-origin exclude each other"
        )
    fields: dict[str, Any] = {}
    if origins or clear:
        fields["allowed_origins"] = list(origins)
    if require_origin is not None:
        fields["require_origin"] = require_origin
    return fields


def cache_ttl_option(function: F) -> F:
    """`--cache-ttl SECONDS`: the project's own response-cache lifetime."""
    return click.option(
        "--cache-ttl",
        "cache_ttl",
        type=click.IntRange(0, MAX_CACHE_TTL_SECONDS),
        metavar="SECONDS",
        help="Cache the project's POSTs for up to this long without a client header "
        "(RESPONSE_CACHE=on); 0: never store its answers.",
    )(function)


def cache_ttl_fields(cache_ttl: int | None, clear: bool = False) -> dict[str, Any]:
    """The body field the cache options give (`clear`: back to the default, null)."""
    if clear and cache_ttl is not None:
        raise click.UsageError("--clear-cache-ttl and --cache-ttl exclude each other")
    if clear:
        return {"cache_ttl_seconds": None}
    return {} if cache_ttl is None else {"cache_ttl_seconds": cache_ttl}
