"""`llm-proxy manage project|token ...`: the management API from the command line."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import click

from ..config import secret_setting
from ..management.client import ManageClient, is_token_value
from .base import (
    F,
    T,
    compact,
    dotenv_environ,
    echo_json,
    fail,
    local_url,
    main,
    run,
    upstream_key,
)
from .policy_options import policy_body, policy_options
from .project_options import (
    cache_ttl_fields,
    cache_ttl_option,
    origin_fields,
    origin_options,
)

# -- manage --------------------------------------------------------------------------


class ManageTarget:
    """Where the management API is and the token for it, as the flags gave them.

    The flags may come at any level (`manage --management-token T project list` or
    `manage project list --management-token T`); the one closest to the command wins.
    What no flag gives comes from the environment or `.env` when a command runs.
    """

    def __init__(self) -> None:
        self.base_url: str | None = None
        self.token: str | None = None

    def client(self) -> ManageClient:
        """A client for one command."""
        environ = dotenv_environ()
        token = self.token or secret_setting(environ, "MANAGEMENT_TOKEN")
        if not token:
            fail(
                "no management token: set MANAGEMENT_TOKEN or MANAGEMENT_TOKEN_FILE "
                "(environment or .env) or pass --management-token",
                2,
            )
        base_url = (
            self.base_url or environ.get("MANAGE_API_BASE_URL") or local_url(environ)
        )
        return ManageClient(base_url, token)


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Keep a flag's value on the command's `ManageTarget` (a later level wins)."""
    if value is None:
        return
    target = ctx.ensure_object(ManageTarget)
    if param.name == "manage_api_base_url":
        target.base_url = value
    else:
        target.token = value


def target_options(function: F) -> F:
    """`--manage-api-base-url` and `--management-token`, accepted at every level."""
    options = [
        click.option(
            "--manage-api-base-url",
            expose_value=False,
            callback=_remember,
            help="Base URL of the proxy (env MANAGE_API_BASE_URL; default: from "
            "LISTEN_ADDR, else http://localhost:8080).",
        ),
        click.option(
            "--management-token",
            expose_value=False,
            callback=_remember,
            help="Prefer the MANAGEMENT_TOKEN variable (environment or .env): flags "
            "are visible in the process list.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def json_option(function: F) -> F:
    """`--json`: print the API's JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(function)


@main.group()
@target_options
def manage() -> None:
    """Projects and tokens through the management API of a running proxy."""


def call_api(
    ctx: click.Context, work: Callable[[ManageClient], Coroutine[Any, Any, T]]
) -> T:
    """Run `work` with a management client."""
    client = ctx.ensure_object(ManageTarget).client()

    async def go() -> T:
        async with client as api:
            return await work(api)

    return run(go())


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A plain aligned table."""
    cells = [list(headers)] + [
        ["" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )


def echo_fields(item: Mapping[str, Any]) -> None:
    """`key: value` lines for one object."""
    width = max(len(k) for k in item)
    for key, value in item.items():
        shown = compact(value) if isinstance(value, dict | list) else value
        click.echo(f"{key.ljust(width)}  {'' if shown is None else shown}")


@manage.group()
@target_options
def project() -> None:
    """Projects: list, get, create, update, delete."""


@project.command("list")
@target_options
@click.option("--search", help="Only names containing this text.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@click.pass_context
def project_list(
    ctx: click.Context, search: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """List projects."""
    items, total = call_api(
        ctx, lambda api: api.list_projects(limit=limit, offset=offset, search=search)
    )
    if as_json:
        echo_json(items)
        return
    rows = [
        (
            p["project_id"],
            p["name"],
            _yes(p["is_active"]),
            p["api_key_hint"],
            p["created_at"],
        )
        for p in items
    ]
    echo_table(rows, ("ID", "NAME", "ACTIVE", "KEY", "CREATED"))
    click.echo(f"{len(items)} of {total} projects")


@project.command("get")
@target_options
@click.argument("project_id")
@json_option
@click.pass_context
def project_get(ctx: click.Context, project_id: str, as_json: bool) -> None:
    """Show one project."""
    item = call_api(ctx, lambda api: api.get_project(project_id))
    echo_json(item) if as_json else echo_fields(item)


@project.command("create")
@target_options
@click.option("--name", required=True)
@click.option("--description")
@click.option("--metadata", help="A JSON object.")
@origin_options
@cache_ttl_option
@policy_options()
@json_option
@click.pass_context
def project_create(
    ctx: click.Context,
    name: str,
    description: str | None,
    metadata: str | None,
    allowed_origins: tuple[str, ...],
    require_origin: bool | None,
    cache_ttl: int | None,
    allowed_models: tuple[str, ...],
    max_output_tokens_cap: int | None,
    streaming: bool | None,
    as_json: bool,
) -> None:
    """Create a project; its upstream key comes from OPENAI_API_KEY or a hidden prompt.

    The policy options set defaults that its tokens can only narrow.
    """
    meta = _json_object(metadata, "--metadata")
    defaults = policy_body(
        allowed_models=allowed_models,
        max_output_tokens_cap=max_output_tokens_cap,
        streaming=streaming,
    )
    api_key = upstream_key(non_interactive=False)
    fields = origin_fields(allowed_origins, False, require_origin)
    fields |= cache_ttl_fields(cache_ttl)
    item = call_api(
        ctx,
        lambda api: api.create_project(
            name=name,
            api_key=api_key,
            description=description,
            metadata=meta,
            **fields,
            **defaults,
        ),
    )
    echo_json(item) if as_json else echo_fields(item)


@project.command("update")
@target_options
@click.argument("project_id")
@click.option("--name")
@click.option("--description")
@click.option("--metadata", help="A JSON object (replaces the old one).")
@click.option("--active/--inactive", default=None, help="Enable or disable.")
@click.option(
    "--rotate-key",
    is_flag=True,
    help="Replace the upstream key (from OPENAI_API_KEY or a hidden prompt).",
)
@origin_options
@click.option(
    "--clear-allowed-origins",
    is_flag=True,
    help="Remove the project's own origins (CORS_ALLOWED_ORIGINS apply).",
)
@cache_ttl_option
@click.option(
    "--clear-cache-ttl",
    is_flag=True,
    help="Back to the default: the cache takes part only when the client asks.",
)
@policy_options(clearing=True)
@json_option
@click.pass_context
def project_update(
    ctx: click.Context,
    project_id: str,
    name: str | None,
    description: str | None,
    metadata: str | None,
    active: bool | None,
    rotate_key: bool,
    allowed_origins: tuple[str, ...],
    require_origin: bool | None,
    clear_allowed_origins: bool,
    cache_ttl: int | None,
    clear_cache_ttl: bool,
    allowed_models: tuple[str, ...],
    max_output_tokens_cap: int | None,
    streaming: bool | None,
    any_model: bool,
    no_output_cap: bool,
    as_json: bool,
) -> None:
    """Change a project's fields (--allowed-origin replaces the whole list; of its
    policy defaults, only those given change)."""
    changes = origin_fields(allowed_origins, clear_allowed_origins, require_origin)
    changes |= cache_ttl_fields(cache_ttl, clear_cache_ttl)
    changes |= policy_body(
        allowed_models=allowed_models,
        max_output_tokens_cap=max_output_tokens_cap,
        streaming=streaming,
        any_model=any_model,
        no_output_cap=no_output_cap,
    )
    if name is not None:
        changes["name"] = name
    if description is not None:
        changes["description"] = description
    if metadata is not None:
        changes["metadata"] = _json_object(metadata, "--metadata")
    if active is not None:
        changes["is_active"] = active
    if rotate_key:
        changes["openai_api_key"] = upstream_key(non_interactive=False)
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    item = call_api(ctx, lambda api: api.update_project(project_id, changes))
    echo_json(item) if as_json else echo_fields(item)


@project.command("delete")
@target_options
@click.argument("project_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def project_delete(ctx: click.Context, project_id: str, yes: bool) -> None:
    """Delete a project and all of its tokens."""
    if not yes:
        click.confirm(f"Delete project {project_id} and its tokens?", abort=True)
    call_api(ctx, lambda api: api.delete_project(project_id))
    click.echo(f"deleted project {project_id}")


@manage.group()
@target_options
def token() -> None:
    """Tokens: generate, list, get, revoke."""


@token.command("generate")
@target_options
@click.option("--project-id", required=True)
@click.option(
    "--duration-minutes", type=click.IntRange(1), default=24 * 60, show_default=True
)
@click.option("--max-requests", type=click.IntRange(1), help="Request budget.")
@click.option("--rate-limit-per-hour", type=click.IntRange(1))
@policy_options(bind=True)
@json_option
@click.pass_context
def token_generate(
    ctx: click.Context,
    project_id: str,
    duration_minutes: int,
    max_requests: int | None,
    rate_limit_per_hour: int | None,
    bind: dict[str, str],
    allowed_models: tuple[str, ...],
    max_output_tokens_cap: int | None,
    streaming: bool | None,
    as_json: bool,
) -> None:
    """Mint a token (its value is shown only now), within its project's defaults."""
    narrowed = policy_body(
        bind=bind,
        allowed_models=allowed_models,
        max_output_tokens_cap=max_output_tokens_cap,
        streaming=streaming,
    )
    item = call_api(
        ctx,
        lambda api: api.create_token(
            project_id=project_id,
            duration_minutes=duration_minutes,
            max_requests=max_requests,
            rate_limit_per_hour=rate_limit_per_hour,
            **narrowed,
        ),
    )
    echo_json(item) if as_json else echo_fields(item)


@token.command("list")
@target_options
@click.option("--project-id")
@click.option("--active/--inactive", default=None, help="Only live or only dead ones.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@click.pass_context
def token_list(
    ctx: click.Context,
    project_id: str | None,
    active: bool | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List tokens, newest first (never their values)."""
    items, total = call_api(
        ctx,
        lambda api: api.list_tokens(
            project_id=project_id, active=active, limit=limit, offset=offset
        ),
    )
    if as_json:
        echo_json(items)
        return
    rows = [
        (
            t["token_id"],
            t["project_id"],
            "..." + t["token_hint"],
            _yes(t["is_active"]),
            t["expires_at"],
            f"{t['request_count']}/{t['max_requests'] or '-'}",
            t["rate_limit_per_hour"] or "-",
        )
        for t in items
    ]
    headers = ("ID", "PROJECT", "TOKEN", "ACTIVE", "EXPIRES", "REQUESTS", "PER HOUR")
    echo_table(rows, headers)
    click.echo(f"{len(items)} of {total} tokens")


@token.command("get")
@target_options
@click.argument("token")
@json_option
@click.pass_context
def token_get(ctx: click.Context, token: str, as_json: bool) -> None:
    """Show one token, by its id or its value (wt-…)."""
    item = call_api(ctx, lambda api: api.get_token(token))
    echo_json(item) if as_json else echo_fields(item)


@token.command("revoke")
@target_options
@click.argument("token")
@click.pass_context
def token_revoke(ctx: click.Context, token: str) -> None:
    """Revoke a token, by its id or its value (wt-…): it stops working at once."""
    if is_token_value(token):  # name it by id: the value is never echoed
        token = str(call_api(ctx, lambda api: api.get_token(token))["token_id"])
    call_api(ctx, lambda api: api.revoke_token(token))
    click.echo(f"revoked token {token}")


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value
