"""Storage: the `Repository` protocol, its records, and `create_repository(dsn)`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dsn import parse_database_url
from . import base
from .audit import AuditEvent, AuditFilter
from .base import *  # noqa: F403 (the records, errors and protocol: base.__all__)
from .base import Repository
from .sqlite import SqliteRepository

if TYPE_CHECKING:
    from .postgres import PostgresRepository

__all__ = [
    *base.__all__,
    "AuditEvent",
    "AuditFilter",
    "PostgresRepository",
    "SqliteRepository",
    "create_repository",
]


def create_repository(
    database_url: str,
    *,
    sql_dir: Path | None = None,
    pool_min_size: int = 1,
    pool_max_size: int = 10,
) -> Repository:
    """The repository for a DSN, chosen by its scheme; no I/O until `connect()`.

    A URL of another form is a ValueError naming DATABASE_URL (without credentials).
    """
    path = parse_database_url(database_url).sqlite_path
    if path is not None:
        return SqliteRepository(path, sql_dir=sql_dir)
    from .postgres import PostgresRepository  # asyncpg only when it is used

    return PostgresRepository(
        database_url,
        sql_dir=sql_dir,
        pool_min_size=pool_min_size,
        pool_max_size=pool_max_size,
    )


def __getattr__(name: str) -> Any:
    """`PostgresRepository` is imported on first use: SQLite setups never load asyncpg."""
    if name == "PostgresRepository":
        from .postgres import PostgresRepository

        return PostgresRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
