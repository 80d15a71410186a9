"""The SQL both backends share: column lists, statements, and their text per dialect.

Each statement is written once, as PostgreSQL text with `{part}` slots. A `Dialect`
fills the slots and, for SQLite, writes the parameters `?n` without their `::type`
casts: those only tell PostgreSQL the type of a parameter that may be NULL, while
SQLite binds every value as it comes. Booleans are spelled `= true` / `= false`,
which PostgreSQL plans as the bare column and SQLite reads as `= 1` / `= 0`; that
and `FILTER (WHERE ...)` need no SQLite newer than the 3.35 RETURNING needs anyway.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, fields
from typing import Final

from .base import UsageEvent

# In the field order of `Project` and of `Token`, so a row converts by position.
PROJECT_COLUMNS: Final = (
    "id, name, description, metadata, openai_api_key, api_key_hint, is_active,"
    " created_at, updated_at, max_concurrent, cache_ttl_seconds, allowed_origins,"
    " require_origin, policy"
)
TOKEN_COLUMNS: Final = (
    "id, token, token_hint, project_id, expires_at, is_active, request_count,"
    " max_requests, rate_limit_per_hour, created_at, last_used_at, max_concurrent,"
    " policy"
)
CHANGE_SEQ: Final = TOKEN_COLUMNS.count(",") + 1  # tokens_changed selects it next
# usage_events has a column per `UsageEvent` field, of the same name, in that order.
USAGE_FIELDS: Final = tuple(field.name for field in fields(UsageEvent))
USAGE_COLUMNS: Final = ", ".join(USAGE_FIELDS)
USAGE_VALUES: Final = operator.attrgetter(*USAGE_FIELDS)  # an event's row as a tuple

PARTS: Final = {
    "project_columns": PROJECT_COLUMNS,
    "token_columns": TOKEN_COLUMNS,
    "usage_columns": USAGE_COLUMNS,
    # $1 a LIKE pattern (escape character backslash) or NULL.
    "search_projects": "($1::text IS NULL OR name {like} $1 ESCAPE '\\')",
    # $1 project id or NULL; $2 wanted liveness or NULL; $3 now. PostgreSQL's custom
    # plans (chosen while they beat the generic plan) fold the NULL tests away, so each
    # filter shape can reach tokens_project_status_created_idx or tokens_created_at_idx.
    "filter_tokens": (
        "($1::uuid IS NULL OR project_id = $1)"
        " AND ($2::boolean IS NULL OR $2 = (is_active = true AND expires_at > $3))"
    ),
    # Change markers (migration 004 of each dialect explains them): pages are read by
    # keyset on (change_seq, id): $1 $2 the cursor, $3 the page size.
    "changed_after": "(change_seq, id) > ($1, $2)",
    # Retention (migration 005 dates revocations): $1 the cut-off.
    "purgeable_tokens": "expires_at < $1 OR (is_active = false AND revoked_at < $1)",
    # $1 since, $2 until, $3 project id or NULL, $4 token id or NULL.
    "usage_where": (
        "ts >= $1 AND ts < $2 AND ($3::uuid IS NULL OR project_id = $3)"
        " AND ($4::uuid IS NULL OR token_id = $4)"
    ),
    "usage_sums": (
        "count(*), count(*) FILTER (WHERE status_code >= 400),"
        " coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
        " coalesce(sum(total_tokens), 0)"
    ),
}
PARAMETER: Final = re.compile(r"\$(\d+)(?:::[a-z]+)?")


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements `SqlBackend` runs, in one dialect's text (`Dialect.statements`).

    The defaults are the templates: PostgreSQL text with `{part}` slots.
    """

    ping: str = "SELECT 1"
    select_schema_version: str = "SELECT coalesce(max(version), 0) FROM schema_version"
    select_meta: str = "SELECT value FROM meta WHERE key = $1"
    upsert_meta: str = (
        "INSERT INTO meta (key, value) VALUES ($1, $2)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    insert_project: str = (
        "INSERT INTO projects ({project_columns})"
        " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13,"
        " $14::jsonb)"
    )
    select_project: str = "SELECT {project_columns} FROM projects WHERE id = $1"
    list_projects: str = (
        "SELECT {project_columns} FROM projects WHERE {search_projects}"
        " ORDER BY created_at, id LIMIT $2 OFFSET $3"
    )
    count_projects: str = "SELECT count(*) FROM projects WHERE {search_projects}"
    update_project: str = """
UPDATE projects SET
    name = coalesce($2, name),
    description = coalesce($3, description),
    metadata = coalesce($4::jsonb, metadata),
    openai_api_key = coalesce($5, openai_api_key),
    api_key_hint = coalesce($6, api_key_hint),
    is_active = coalesce($7, is_active),
    max_concurrent = CASE WHEN $8 THEN NULL ELSE coalesce($9, max_concurrent) END,
    cache_ttl_seconds = CASE WHEN $10 THEN NULL ELSE coalesce($11, cache_ttl_seconds) END,
    allowed_origins = coalesce($12::jsonb, allowed_origins),
    require_origin = coalesce($13, require_origin),
    policy = CASE WHEN $14 THEN NULL ELSE coalesce($15::jsonb, policy) END,
    updated_at = $16
WHERE id = $1
RETURNING {project_columns}"""
    delete_project: str = "DELETE FROM projects WHERE id = $1"
    insert_token: str = (
        "INSERT INTO tokens ({token_columns})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb)"
    )
    select_token: str = "SELECT {token_columns} FROM tokens WHERE id = $1"
    select_token_by_hash: str = "SELECT {token_columns} FROM tokens WHERE token = $1"
    list_tokens: str = (
        "SELECT {token_columns} FROM tokens WHERE {filter_tokens}"
        " ORDER BY created_at DESC, id LIMIT $4 OFFSET $5"
    )
    count_tokens: str = "SELECT count(*) FROM tokens WHERE {filter_tokens}"
    revoke_token: str = "UPDATE tokens SET is_active = false WHERE id = $1"
    # last_used_at only moves forward; a NULL one compares as unknown and takes $3.
    record_token_usage: str = (
        "UPDATE tokens SET request_count = request_count + $2, last_used_at ="
        " CASE WHEN last_used_at >= $3 THEN last_used_at ELSE $3 END WHERE id = $1"
    )
    tokens_changed: str = (
        "SELECT {token_columns}, change_seq FROM tokens"
        " WHERE {changed_after} AND (NOT $4 OR is_active = true)"
        " ORDER BY change_seq, id LIMIT $3"
    )
    projects_changed: str = (
        "SELECT {project_columns}, change_seq FROM projects"
        " WHERE {changed_after} ORDER BY change_seq, id LIMIT $3"
    )
    deletions_since: str = (
        "SELECT kind, id, change_seq FROM deletions"
        " WHERE {changed_after} ORDER BY change_seq, id LIMIT $3"
    )
    purge_deletions: str = "DELETE FROM deletions WHERE deleted_at < $1"
    count_purgeable_tokens: str = "SELECT count(*) FROM tokens WHERE {purgeable_tokens}"
    count_old_usage_events: str = "SELECT count(*) FROM usage_events WHERE ts < $1"
    usage_totals: str = "SELECT {usage_sums} FROM usage_events WHERE {usage_where}"
    usage_by_day: str = (
        "SELECT {day} AS day, {usage_sums} FROM usage_events"
        " WHERE {usage_where} GROUP BY day ORDER BY day"
    )
    usage_by_project: str = (
        "SELECT project_id, {usage_sums} FROM usage_events"
        " WHERE {usage_where} AND project_id IS NOT NULL"
        " GROUP BY project_id ORDER BY count(*) DESC, project_id LIMIT $5"
    )
    usage_by_token: str = (
        "SELECT token_id, {usage_sums} FROM usage_events"
        " WHERE {usage_where} AND token_id IS NOT NULL"
        " GROUP BY token_id ORDER BY count(*) DESC, token_id LIMIT $5"
    )
    recent_usage_events: str = (
        "SELECT {usage_columns} FROM usage_events"
        " WHERE (NOT $1 OR status_code >= 400) ORDER BY ts DESC, event_id LIMIT $2"
    )


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the shared statements leave to one database, and how it marks parameters."""

    name: str  # also the folder of its migrations, sql/<name>/
    like: str  # LIKE that ignores case
    day: str  # a row's ts as its UTC day, YYYY-MM-DD
    question_marks: bool = False  # parameters as ?n, without casts (SQLite)

    def render(self, template: str) -> str:
        """`template` in this dialect: its slots filled, its parameters marked."""
        parts = {"like": self.like, "day": self.day}
        parts |= {name: part.format_map(parts) for name, part in PARTS.items()}
        text = template.format_map(parts)
        return PARAMETER.sub(r"?\1", text) if self.question_marks else text

    def statements(self) -> Statements:
        """Every shared statement, rendered."""
        templates = {field.name: field.default for field in fields(Statements)}
        return Statements(
            **{
                name: self.render(text)
                for name, text in templates.items()
                if isinstance(text, str)
            }
        )
