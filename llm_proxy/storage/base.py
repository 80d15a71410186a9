"""Storage records and the `Repository` protocol every database backend implements.

Records are frozen dataclasses: driver rows (`sqlite3.Row`, `asyncpg.Record`) never
leave the backend modules. Times are timezone-aware UTC `datetime`s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from ..domain_errors import ProxyError
from .audit import AuditStore

__all__ = [  # what `llm_proxy.storage` re-exports
    "ChangeCursor",
    "ChangePage",
    "Deletion",
    "DuplicateNameError",
    "MigrationError",
    "Project",
    "ProjectChanges",
    "PurgeCounts",
    "RejectedRowsError",
    "Repository",
    "RepositoryError",
    "RevokeCounts",
    "Token",
    "TokenFilter",
    "TokenPolicy",
    "TokenUsage",
    "UsageEvent",
    "UsageRow",
    "UsageTotals",
]

T = TypeVar("T")

# Where a page of changes ended: (change marker, id) of its last row.
ChangeCursor = tuple[int, str]


class RepositoryError(ProxyError):
    """Base of every error a repository raises on purpose."""


class DuplicateNameError(RepositoryError):
    """A project with that name already exists."""


class MigrationError(RepositoryError):
    """A schema migration could not be applied."""


class RejectedRowsError(RepositoryError):
    """The database refused the rows themselves: sending them again cannot help.

    Raised for bad data (NOT NULL, out-of-range numbers, undecodable text), never
    for a lost connection or a busy database, which are worth retrying.
    """


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token may send, narrowing the API; a project's holds the defaults.

    `bind`: metadata each call must repeat in a header (`user_id` -> `X-Proxy-User-Id`),
    never on a project. `allowed_models`: globs the body's model must match (None: any).
    `max_output_tokens_cap`: a ceiling on the requested output tokens (None: none).
    """

    bind: Mapping[str, str] = field(default_factory=dict)
    allowed_models: tuple[str, ...] | None = None
    max_output_tokens_cap: int | None = None
    allow_streaming: bool = True


@dataclass(frozen=True, slots=True)
class Project:
    """One project: who owns tokens and whose upstream key they spend."""

    id: str
    name: str
    description: str
    metadata: Mapping[str, Any]
    encrypted_api_key: str = field(repr=False)  # AES-GCM envelope, never plaintext
    api_key_hint: str  # masked form for display, e.g. "sk-...abcd"
    is_active: bool
    created_at: datetime
    updated_at: datetime
    max_concurrent: int | None = None  # None: the PROJECT_MAX_CONCURRENT default
    # Response cache: seconds its answers may be kept; None: only what clients ask
    # for, 0: never cached (see docs/caching.md).
    cache_ttl_seconds: int | None = None
    # Canonical browser origins (llm_proxy.origins); empty: CORS_ALLOWED_ORIGINS apply.
    allowed_origins: tuple[str, ...] = ()
    require_origin: bool = False  # its tokens are refused without an Origin header
    policy: TokenPolicy | None = None  # defaults its tokens can only narrow


@dataclass(frozen=True, slots=True)
class ProjectChanges:
    """Fields of a project to change; None leaves a field as it is.

    `max_concurrent`, `cache_ttl_seconds` and `policy` are nullable in storage: their
    `clear_*` flag sets them to NULL.
    """

    name: str | None = None
    description: str | None = None
    metadata: Mapping[str, Any] | None = None
    encrypted_api_key: str | None = field(default=None, repr=False)
    api_key_hint: str | None = None
    is_active: bool | None = None
    max_concurrent: int | None = None
    clear_max_concurrent: bool = False
    cache_ttl_seconds: int | None = None
    clear_cache_ttl_seconds: bool = False
    allowed_origins: tuple[str, ...] | None = None  # () empties the list
    require_origin: bool | None = None
    policy: TokenPolicy | None = None
    clear_policy: bool = False


@dataclass(frozen=True, slots=True)
class Token:
    """One withering token. Only the HMAC of its value is ever stored."""

    id: str
    token_hash: str = field(repr=False)  # hex HMAC-SHA256 of the token value
    token_hint: str  # last 4 characters of the token value
    project_id: str
    expires_at: datetime
    is_active: bool
    request_count: int
    max_requests: int | None
    rate_limit_per_hour: int | None
    created_at: datetime
    last_used_at: datetime | None
    max_concurrent: int | None = None  # None: the TOKEN_MAX_CONCURRENT default
    policy: TokenPolicy | None = None  # None: only its project's defaults apply
    # The row's change marker as `load_tokens_changed_since` read it (None from every
    # other read): every write gives the row a new one, so it names this version.
    change_seq: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Requests a token made since the last flush, for `record_token_usage`."""

    token_id: str
    requests: int
    last_used_at: datetime


@dataclass(frozen=True, slots=True)
class Deletion:
    """A tombstone: a token or project row that was deleted."""

    kind: str  # "token" or "project"
    id: str


@dataclass(frozen=True, slots=True)
class ChangePage(Generic[T]):
    """One page of changed rows in marker order; `cursor` is None after the last."""

    rows: list[T]
    cursor: ChangeCursor | None


@dataclass(frozen=True, slots=True)
class RevokeCounts:
    """Outcome of revoking all tokens of a project."""

    revoked_count: int
    already_revoked_count: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    """Rows that retention deletes (or, in a dry run, would delete)."""

    tokens: int = 0
    usage_events: int = 0
    audit_events: int = 0


@dataclass(frozen=True, slots=True)
class TokenFilter:
    """Which tokens `list_tokens`/`count_tokens` return."""

    project_id: str | None = None
    active: bool | None = None  # True: is_active and not expired; False: the rest


@dataclass(slots=True)  # not frozen: one is built per proxied call, and that is slower
class UsageEvent:
    """One proxied request as the usage pages count it; `event_id` makes it unique."""

    event_id: str
    ts: datetime
    project_id: str | None
    token_id: str | None
    endpoint: str
    method: str
    status_code: int
    duration_ms: float
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    usage_source: str | None = None  # where the token counts came from


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Requests, errors (status >= 400) and tokens summed over some events."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """The totals of one group: a UTC day (`2025-01-31`), a project id or a token id."""

    key: str
    totals: UsageTotals


class Repository(AuditStore, Protocol):
    """Intent-named storage operations; no raw SQL crosses this boundary."""

    async def connect(self) -> None:
        """Open connections (pool, file); no schema work."""

    async def close(self) -> None:
        """Close connections; safe to call twice."""

    async def migrate(self) -> list[int]:
        """Apply pending `sql/<dialect>/NNN_*.sql` files; return versions applied."""

    async def schema_version(self) -> int:
        """Highest applied migration version (0 when none)."""

    async def ping(self) -> None:
        """Raise if the database does not answer a trivial query."""

    async def get_meta(self, key: str) -> str | None:
        """Read a server-wide value (e.g. the encryption key check)."""

    async def set_meta(self, key: str, value: str) -> None:
        """Write a server-wide value, replacing any previous one."""

    async def create_project(self, project: Project) -> None:
        """Insert a project; `DuplicateNameError` when the name is taken."""

    async def get_project(self, project_id: str) -> Project | None:
        """One project by id."""

    async def list_projects(
        self, *, limit: int, offset: int, search: str | None = None
    ) -> list[Project]:
        """Projects ordered by created_at then id; `search` matches name substrings."""

    async def count_projects(self, *, search: str | None = None) -> int:
        """How many projects `list_projects` would page through."""

    async def update_project(
        self, project_id: str, changes: ProjectChanges, *, now: datetime
    ) -> Project | None:
        """Apply changes and set updated_at; None when the project is unknown."""

    async def delete_project(self, project_id: str) -> bool:
        """Delete a project and (by cascade) its tokens; False when unknown."""

    async def create_token(self, token: Token) -> None:
        """Insert a token record; `RepositoryError` when its project is unknown."""

    async def get_token(self, token_id: str) -> Token | None:
        """One token by its public id."""

    async def get_token_by_hash(self, token_hash: str) -> Token | None:
        """One token by the HMAC of its value."""

    async def list_tokens(
        self, token_filter: TokenFilter, *, now: datetime, limit: int, offset: int
    ) -> list[Token]:
        """Tokens ordered by created_at descending then id."""

    async def count_tokens(self, token_filter: TokenFilter, *, now: datetime) -> int:
        """How many tokens `list_tokens` would page through."""

    async def revoke_token(self, token_id: str) -> bool:
        """Set is_active false; False when the token is unknown (idempotent)."""

    async def revoke_project_tokens(self, project_id: str) -> RevokeCounts:
        """Revoke every token of a project."""

    async def record_token_usage(self, usage: Sequence[TokenUsage]) -> None:
        """Add request counts and move last_used_at forward, in one transaction."""

    async def change_mark(self) -> int:
        """A mark such that every change not visible yet will carry a marker >= it."""

    async def load_tokens_changed_since(
        self,
        mark: int,
        *,
        after: ChangeCursor | None = None,
        limit: int,
        active_only: bool = False,
        unchanged: Callable[[str, int], bool] | None = None,
    ) -> ChangePage[Token]:
        """Tokens inserted or updated with a marker >= `mark` (expired and revoked
        ones too, unless `active_only`), in marker order, from `after` on.

        A row for which `unchanged(token_hash, change_seq)` is true is left out of
        `rows` without being converted (the page's cursor still moves past it)."""

    async def load_projects_changed_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Project]:
        """Projects inserted or updated with a marker >= `mark`, from `after` on."""

    async def load_deletions_since(
        self, mark: int, *, after: ChangeCursor | None = None, limit: int
    ) -> ChangePage[Deletion]:
        """Tokens and projects deleted with a marker >= `mark`, from `after` on."""

    async def purge_deletions(self, *, before: datetime) -> int:
        """Forget tombstones older than `before`; return how many."""

    def purge_lock(self, *, lease_s: float) -> AbstractAsyncContextManager[bool]:
        """Hold the one retention-purge lock of every process on this database.

        Yields False at once when another process holds it. The lock ends with the
        block, or when its holder dies (its connection closes, or after `lease_s`
        where the database has no lock tied to a connection).
        """

    async def count_purgeable(
        self, *, tokens_before: datetime | None, usage_before: datetime | None
    ) -> PurgeCounts:
        """What the purges would delete at these cut-offs (None: that kind is kept)."""

    async def purge_tokens(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` tokens that expired or were revoked before `before`,
        in one short transaction (tombstones included); return how many."""

    async def purge_usage_events(self, *, before: datetime, limit: int) -> int:
        """Delete up to `limit` usage events with ts before `before`, oldest first,
        in one short transaction; return how many."""

    async def insert_usage_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert events, skipping event ids already stored; return rows inserted.

        Text is stored cleaned (`storable_usage_event`); rows the database cannot
        take raise `RejectedRowsError`, and then the call inserts none of them.
        """

    async def usage_totals(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> UsageTotals:
        """Totals of events with since <= ts < until, optionally of one project/token."""

    async def usage_by_day(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        token_id: str | None = None,
    ) -> list[UsageRow]:
        """Totals per UTC day that has events, oldest first."""

    async def usage_by_project(
        self, *, since: datetime, until: datetime, limit: int = 50
    ) -> list[UsageRow]:
        """Totals per project id, busiest first."""

    async def usage_by_token(
        self,
        *,
        since: datetime,
        until: datetime,
        project_id: str | None = None,
        limit: int = 50,
    ) -> list[UsageRow]:
        """Totals per token id, busiest first, optionally of one project."""

    async def recent_usage_events(
        self, limit: int, *, errors_only: bool = False
    ) -> list[UsageEvent]:
        """The newest events (only status >= 400 when `errors_only`)."""
