"""Finding and ordering the numbered schema files in `sql/<dialect>/NNN_name.sql`.

`SQL_DIR` is the `sql/` folder shipped inside this package (package data), so a
source checkout and an installed wheel read the same place.

Backends apply them; this module only reads the directory and decides what is pending.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .base import MigrationError

SQL_DIR: Final = Path(__file__).resolve().parent / "sql"
MIGRATION_FILE: Final = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema file: its version number, name and SQL text."""

    version: int
    name: str
    sql: str


def load_migrations(sql_dir: Path, dialect: str) -> list[Migration]:
    """Every migration of `dialect`, ordered by version; `MigrationError` if invalid."""
    directory = sql_dir / dialect
    if not directory.is_dir():
        raise MigrationError(f"no migrations directory for {dialect!r}: {directory}")
    migrations = [_load(path) for path in sorted(directory.glob("*.sql"))]
    _check_unique(migrations)
    return migrations


def pending(
    migrations: Sequence[Migration], applied: Collection[int]
) -> list[Migration]:
    """The migrations whose version is not yet applied, in order."""
    return [migration for migration in migrations if migration.version not in applied]


def _load(path: Path) -> Migration:
    match = MIGRATION_FILE.match(path.name)
    if match is None:
        raise MigrationError(f"migration file name must look like 001_name.sql: {path}")
    if int(match["version"]) == 0:
        raise MigrationError(f"migration versions start at 001: {path}")
    return Migration(
        version=int(match["version"]),
        name=match["name"],
        sql=path.read_text(encoding="utf-8"),
    )


def _check_unique(migrations: Sequence[Migration]) -> None:
    seen: set[int] = set()
    for migration in migrations:
        if migration.version in seen:
            raise MigrationError(
                f"two migrations share version {migration.version:03d}"
            )
        seen.add(migration.version)


def migration_failed(migration: Migration, exc: Exception) -> MigrationError:
    """The error to raise when the database refused `migration`."""
    return MigrationError(
        f"migration {migration.version:03d}_{migration.name} failed: {exc}"
    )
