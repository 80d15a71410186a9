"""Storage: the `Repository` protocol, its records, and `create_repository(dsn)`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .base import (
    ChangeCursor,
    ChangePage,
    Deletion,
    DuplicateNameError,
    MigrationError,
    Project,
    ProjectChanges,
    RejectedRowsError,
    Repository,
    RepositoryError,
    RevokeCounts,
    Token,
    TokenFilter,
    TokenUsage,
    UsageEvent,
    UsageRow,
    UsageTotals,
)
from .sqlite import SqliteRepository

if TYPE_CHECKING:
    from .postgres import PostgresRepository

__all__ = [
    "ChangeCursor",
    "ChangePage",
    "Deletion",
    "DuplicateNameError",
    "MigrationError",
    "PostgresRepository",
    "Project",
    "ProjectChanges",
    "RejectedRowsError",
    "Repository",
    "RepositoryError",
    "RevokeCounts",
    "SqliteRepository",
    "Token",
    "TokenFilter",
    "TokenUsage",
    "UsageEvent",
    "UsageRow",
    "UsageTotals",
    "create_repository",
]

SQLITE_PREFIX: Final = "sqlite:///"

Factory = Callable[[str, Path | None, int, int], Repository]


def _sqlite(dsn: str, sql_dir: Path | None, min_size: int, max_size: int) -> Repository:
    if not dsn.startswith(SQLITE_PREFIX) or dsn == SQLITE_PREFIX:
        raise ValueError(
            "DATABASE_URL: a SQLite URL looks like sqlite:///relative/path.db"
            " or sqlite:////absolute/path.db"
        )
    return SqliteRepository(Path(dsn.removeprefix(SQLITE_PREFIX)), sql_dir=sql_dir)


def _postgres(
    dsn: str, sql_dir: Path | None, min_size: int, max_size: int
) -> Repository:
    from .postgres import PostgresRepository  # asyncpg only when it is used

    return PostgresRepository(
        dsn, sql_dir=sql_dir, pool_min_size=min_size, pool_max_size=max_size
    )


BACKENDS: Final[dict[str, Factory]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
    "postgresql": _postgres,
}


def create_repository(
    database_url: str,
    *,
    sql_dir: Path | None = None,
    pool_min_size: int = 1,
    pool_max_size: int = 10,
) -> Repository:
    """The repository for a DSN, chosen by its scheme; no I/O until `connect()`."""
    scheme, separator, _ = database_url.partition("://")
    scheme = scheme.lower() if separator else ""
    factory = BACKENDS.get(scheme)
    if factory is None:
        # Only the scheme is echoed: the rest of the URL may hold a password.
        raise ValueError(
            f"DATABASE_URL: unsupported scheme {scheme!r};"
            f" expected one of {', '.join(sorted(BACKENDS))}"
        )
    return factory(database_url, sql_dir, pool_min_size, pool_max_size)


def __getattr__(name: str) -> Any:
    """`PostgresRepository` is imported on first use: SQLite setups never load asyncpg."""
    if name == "PostgresRepository":
        from .postgres import PostgresRepository

        return PostgresRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
