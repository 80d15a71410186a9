"""DATABASE_URL and REDIS_URL: the one parser of their forms, shared by settings and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

DatabaseKind = Literal["sqlite", "postgres"]

# Schemes of DATABASE_URL (compared in lower case) and the backend each one names.
DATABASE_SCHEMES: Final[dict[str, DatabaseKind]] = {
    "sqlite": "sqlite",
    "postgres": "postgres",
    "postgresql": "postgres",
}
REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
DATABASE_URL_FORMS: Final = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db or postgres://user@host/db"
)


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    """A checked DATABASE_URL: its backend and, for SQLite, its file."""

    kind: DatabaseKind
    url: str = field(repr=False)  # as given: PostgreSQL's driver reads it whole
    sqlite_path: Path | None = None  # relative paths are from the working directory

    @property
    def is_postgres(self) -> bool:
        """True for PostgreSQL (which needs ENCRYPTION_KEY)."""
        return self.kind == "postgres"


def parse_database_url(url: str) -> DatabaseUrl:
    """`sqlite:///path` or `postgres[ql]://...`; ValueError names DATABASE_URL."""
    scheme, separator, rest = url.partition("://")
    kind = DATABASE_SCHEMES.get(scheme.lower()) if separator else None
    if kind == "sqlite" and rest.startswith("/") and len(rest) > 1:
        return DatabaseUrl(kind, url, Path(rest[1:]))
    if kind == "postgres" and rest:
        return DatabaseUrl(kind, url)
    raise ValueError(
        f"DATABASE_URL must be {DATABASE_URL_FORMS}, got {redacted(url)!r}"
    )


def parse_redis_url(url: str) -> str:
    """`redis://`, `rediss://` or `unix://`, kept as given; ValueError names REDIS_URL."""
    scheme, separator, _ = url.partition("://")
    if separator and scheme.lower() in REDIS_SCHEMES:
        return url
    raise ValueError(
        "REDIS_URL must start with redis://, rediss:// or unix://, "
        f"got {redacted(url)!r}"
    )


def redacted(url: str) -> str:
    """`url` with its user and password (all before the last `@`) shown as `***`."""
    if "@" not in url:
        return url
    credentials, _, address = url.rpartition("@")
    scheme, separator, _ = credentials.partition("://")
    return f"{scheme}{separator}***@{address}" if separator else f"***@{address}"
