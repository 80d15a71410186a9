"""The `llm-proxy` command line (click).

Settings rule: built-in defaults < `.env` in the working directory < environment <
command-line flags. Flags are mapped onto the environment variable names and passed as
`overrides` to `Settings.from_env`, so there is one parser and one set of messages.
Secrets (MANAGEMENT_TOKEN, ENCRYPTION_KEY, upstream keys) are never flags: they would
show in the process list.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .app import master_key
from .config import ConfigError, Settings, environ_with_dotenv
from .logs import configure_logging
from .repository import create_repository
from .services import KeyMismatchError

F = TypeVar("F", bound=Callable[..., Any])

SERVE_FLAGS: Mapping[str, str] = {
    "listen_addr": "LISTEN_ADDR",
    "database_url": "DATABASE_URL",
    "openai_api_url": "OPENAI_API_URL",
    "api_config_path": "API_CONFIG_PATH",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "file_event_log": "FILE_EVENT_LOG",
}


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from `.env`, the environment and the given flag values."""
    overrides = {
        SERVE_FLAGS[name]: str(value)
        for name, value in (flags or {}).items()
        if name in SERVE_FLAGS and value is not None
    }
    environ = environ_with_dotenv(os.environ, Path(".env"))
    return Settings.from_env(environ, overrides=overrides)


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr and a non-zero exit (no traceback)."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def settings_options(function: F) -> F:
    """The flags that override settings, shared by commands that start the app."""
    options = [
        click.option(
            "--listen-addr", help="Address to listen on, e.g. :8080 (LISTEN_ADDR)."
        ),
        click.option(
            "--database-url", help="sqlite:///path.db or postgres://... (DATABASE_URL)."
        ),
        click.option("--openai-api-url", help="Upstream base URL (OPENAI_API_URL)."),
        click.option(
            "--api-config-path", help="Allowlist YAML file (API_CONFIG_PATH)."
        ),
        click.option("--log-level", help="debug, info, warning, error (LOG_LEVEL)."),
        click.option("--log-format", help="json or text (LOG_FORMAT)."),
        click.option(
            "--file-event-log", help="Write events to this JSONL file (FILE_EVENT_LOG)."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm-proxy")
def main() -> None:
    """llm-proxy: a transparent OpenAI proxy with short-lived withering tokens."""


@main.command()
@settings_options
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Reserved; one process for now.",
)
def serve(workers: int, **flags: Any) -> None:
    """Run the proxy in the foreground until SIGTERM or Ctrl-C."""
    from .server import serve as run_server

    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        fail(str(exc), 2)
        return
    if workers != 1:
        fail("--workers other than 1 is not supported yet", 2)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run_server(settings)
    except KeyMismatchError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc.strerror}"
        )


@main.group()
def db() -> None:
    """Database schema: migrate, status."""


@db.command("migrate")
@click.option("--database-url", help="Override DATABASE_URL.")
def db_migrate(database_url: str | None) -> None:
    """Apply pending migrations (also done at every start)."""
    applied = _with_repository(database_url, lambda repo: repo.migrate())
    click.echo(
        f"applied migrations: {applied}" if applied else "database is up to date"
    )


@db.command("status")
@click.option("--database-url", help="Override DATABASE_URL.")
def db_status(database_url: str | None) -> None:
    """Print the schema version."""
    version = _with_repository(database_url, lambda repo: repo.schema_version())
    click.echo(f"schema version: {version}")


def _with_repository(database_url: str | None, work: Callable[[Any], Any]) -> Any:
    try:
        settings = load_settings({"database_url": database_url})
    except ConfigError as exc:
        fail(str(exc), 2)
    master_key(settings)

    async def run() -> Any:
        repository = create_repository(settings.database_url)
        await repository.connect()
        try:
            return await work(repository)
        finally:
            await repository.close()

    return asyncio.run(run())
