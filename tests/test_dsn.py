"""DATABASE_URL and REDIS_URL forms: the one parser every reader of them uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_proxy.dsn import parse_database_url, parse_redis_url


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative/proxy.db", Path("relative/proxy.db")),
        ("sqlite:///./data/llm-proxy.db", Path("data/llm-proxy.db")),
        ("sqlite:////absolute/proxy.db", Path("/absolute/proxy.db")),
        ("SQLite:///upper/proxy.db", Path("upper/proxy.db")),
    ],
)
def test_a_sqlite_url_names_its_file(url: str, path: Path) -> None:
    database = parse_database_url(url)
    assert (database.kind, database.sqlite_path) == ("sqlite", path)
    assert not database.is_postgres and database.url == url


@pytest.mark.parametrize(
    "url",
    [
        "postgres://user@host/db",
        "postgresql://user:pw@host:5432/db?search_path=s",
        "PostgreSQL://user@host/db",
    ],
)
def test_a_postgres_url_is_kept_whole_for_the_driver(url: str) -> None:
    database = parse_database_url(url)
    assert (database.kind, database.sqlite_path, database.url) == (
        "postgres",
        None,
        url,
    )
    assert database.is_postgres


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:s3cret@host/db",
        "sqlite://host/proxy.db",
        "sqlite:///",
        "proxy.db",
        "postgres://",
        "",
    ],
)
def test_other_database_urls_are_refused_naming_the_setting(url: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL") as caught:
        parse_database_url(url)
    assert "s3cret" not in str(caught.value)


def test_a_refused_database_url_shows_its_host_but_no_credentials() -> None:
    with pytest.raises(ValueError) as caught:
        parse_database_url("mysql://root:s3cret@db.example:3306/proxy")
    message = str(caught.value)
    assert "db.example:3306/proxy" in message
    assert "root" not in message and "s3cret" not in message


def test_the_repr_of_a_database_url_hides_its_password() -> None:
    database = parse_database_url("postgresql://user:s3cret@host/db")
    assert "s3cret" not in repr(database)


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@host/1", "unix:///run/r.sock"]
)
def test_redis_urls_are_kept_as_given(url: str) -> None:
    assert parse_redis_url(url) == url


@pytest.mark.parametrize("url", ["http://:s3cret@localhost", "localhost:6379", ""])
def test_other_redis_urls_are_refused_without_their_credentials(url: str) -> None:
    with pytest.raises(ValueError, match="REDIS_URL") as caught:
        parse_redis_url(url)
    assert "s3cret" not in str(caught.value)
