"""Storage: the `Repository` protocol, its records, and `create_repository(dsn)`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..dsn import DatabaseKind, parse_database_url
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

Factory = Callable[[str, Path | None, int, int], Repository]


def _sqlite(dsn: str, sql_dir: Path | None, min_size: int, max_size: int) -> Repository:
    path = parse_database_url(dsn).sqlite_path
    assert path is not None  # create_repository chose this backend by the URL's kind
    return SqliteRepository(path, sql_dir=sql_dir)


def _postgres(
    dsn: str, sql_dir: Path | None, min_size: int, max_size: int
) -> Repository:
    from .postgres import PostgresRepository  # asyncpg only when it is used

    return PostgresRepository(
        dsn, sql_dir=sql_dir, pool_min_size=min_size, pool_max_size=max_size
    )


BACKENDS: Final[dict[DatabaseKind, Factory]] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


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
    factory = BACKENDS[parse_database_url(database_url).kind]
    return factory(database_url, sql_dir, pool_min_size, pool_max_size)


def __getattr__(name: str) -> Any:
    """`PostgresRepository` is imported on first use: SQLite setups never load asyncpg."""
    if name == "PostgresRepository":
        from .postgres import PostgresRepository

        return PostgresRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
