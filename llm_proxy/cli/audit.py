"""`llm-proxy manage audit list|get`: the audit trail through the management API."""

from __future__ import annotations

from typing import Any, Final

import click

from ..audit.trail import OUTCOMES
from .base import echo_json
from .manage import (
    call_api,
    echo_fields,
    echo_table,
    json_option,
    manage,
    target_options,
)

HEADERS: Final = (
    "TIME",
    "ACTION",
    "ACTOR",
    "OUTCOME",
    "PROJECT",
    "TOKEN",
    "CLIENT",
    "REASON",
)
COLUMNS: Final = (
    "timestamp",
    "action",
    "actor",
    "outcome",
    "project_id",
    "token_id",
    "client_ip",
    "reason",
)


@manage.group()
@target_options
def audit() -> None:
    """The audit trail: who changed what, and refused sign-ins."""


@audit.command("list")
@target_options
@click.option("--action", help="e.g. project.create, token.revoke, auth.failed.")
@click.option("--actor", help="management_api, or the admin user name.")
@click.option("--project-id")
@click.option("--token-id")
@click.option("--outcome", type=click.Choice(OUTCOMES))
@click.option("--since", help="From this time on (ISO 8601; without a zone: UTC).")
@click.option("--until", help="Before this time (ISO 8601; without a zone: UTC).")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True)
@click.option("--page-size", type=click.IntRange(1, 100), default=20, show_default=True)
@json_option
@click.pass_context
def audit_list(
    ctx: click.Context,
    action: str | None,
    actor: str | None,
    project_id: str | None,
    token_id: str | None,
    outcome: str | None,
    since: str | None,
    until: str | None,
    page: int,
    page_size: int,
    as_json: bool,
) -> None:
    """List audit events, newest first."""
    filters = {
        "action": action,
        "actor": actor,
        "project_id": project_id,
        "token_id": token_id,
        "outcome": outcome,
        "start_time": since,
        "end_time": until,
    }
    found = call_api(
        ctx, lambda api: api.list_audit(page=page, page_size=page_size, **filters)
    )
    if as_json:
        echo_json(found)
        return
    events: list[dict[str, Any]] = found["events"]
    echo_table([[e[name] for name in COLUMNS] for e in events], HEADERS)
    paging = found["pagination"]
    click.echo(
        f"{len(events)} of {paging['total_count']} events"
        f" (page {paging['page']} of {max(1, paging['total_pages'])})"
    )


@audit.command("get")
@target_options
@click.argument("event_id")
@json_option
@click.pass_context
def audit_get(ctx: click.Context, event_id: str, as_json: bool) -> None:
    """Show one audit event."""
    item = call_api(ctx, lambda api: api.get_audit(event_id))
    echo_json(item) if as_json else echo_fields(item)
