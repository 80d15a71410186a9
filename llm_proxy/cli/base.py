"""Shared pieces of the command line: the root group, errors, settings, event loop."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import orjson

from .. import __version__
from ..config import (
    ConfigError,
    Settings,
    environ_with_dotenv,
    parse_listen_addr,
)
from ..domain_errors import ProxyError
from ..management.client import ManageApiError
from ..management.service import (
    KeyMismatchError,
    ServiceError,
)
from ..server import (
    PidFileError,
    base_url_for,
)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEFAULT_MANAGE_URL = "http://localhost:8080"
DAEMON_START_TIMEOUT_S = 15.0
EXIT_NOT_RUNNING = 3
# Commands that never read MANAGEMENT_TOKEN (db, dispatcher) pass this in its place,
# so the one settings parser does not demand it from them.
UNUSED_MANAGEMENT_TOKEN = "not-used-by-this-command"
# Other names a command answers to (not listed in --help), for scripts that spell it so.
COMMAND_ALIASES: Mapping[str, str] = {"benchmark": "bench"}

SERVE_FLAGS: Mapping[str, str] = {
    "listen_addr": "LISTEN_ADDR",
    "database_url": "DATABASE_URL",
    "openai_api_url": "OPENAI_API_URL",
    "api_config_path": "API_CONFIG_PATH",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "file_event_log": "FILE_EVENT_LOG",
    "workers": "WORKERS",
}


class CliError(click.ClickException, ProxyError):
    """A failure shown as one `error: ...` line (exit code 1)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


class CliUsageError(CliError):
    """A usage or configuration error (exit code 2)."""

    exit_code = 2


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit (no traceback); code 1 or 2."""
    raise CliUsageError(message) if code == 2 else CliError(message)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh (uvloop when available) event loop."""
    from ..server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def dotenv_environ() -> dict[str, str]:
    """The environment over `.env` of the working directory."""
    return environ_with_dotenv(os.environ, Path(".env"))


def load_settings(
    flags: Mapping[str, Any] | None = None, *, needs_management_token: bool = True
) -> Settings:
    """Settings from `.env`, the environment and the given flag values.

    `needs_management_token=False`: for commands that never use it (any value set is
    ignored, none is demanded).
    """
    overrides = {
        SERVE_FLAGS[name]: str(value)
        for name, value in (flags or {}).items()
        if name in SERVE_FLAGS and value is not None
    }
    if not needs_management_token:
        overrides["MANAGEMENT_TOKEN"] = UNUSED_MANAGEMENT_TOKEN
    return Settings.from_env(dotenv_environ(), overrides=overrides)


def settings_environ(flags: Mapping[str, Any]) -> dict[str, str]:
    """What `load_settings(flags)` reads, as one environment (for child processes)."""
    environ = dotenv_environ()
    environ.update(
        (SERVE_FLAGS[name], str(value))
        for name, value in flags.items()
        if name in SERVE_FLAGS and value is not None
    )
    return environ


def local_url(environ: Mapping[str, str]) -> str:
    """The base URL of the local proxy: from LISTEN_ADDR, else localhost:8080."""
    raw = environ.get("LISTEN_ADDR", "").strip()
    if not raw:
        return DEFAULT_MANAGE_URL
    host, port = parse_listen_addr(raw)
    return base_url_for(host, port)


def proxy_url(given: str | None) -> str:
    """A `--base-url` as given, else the local proxy of `.env` and the environment."""
    return given or local_url(dotenv_environ())


class ProxyGroup(click.Group):
    """The root group: expected failures become one line unless `--debug`."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A command by its name or by one of `COMMAND_ALIASES`."""
        return super().get_command(ctx, COMMAND_ALIASES.get(cmd_name, cmd_name))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            raise _as_cli_error(exc) from exc


def _as_cli_error(exc: Exception) -> CliError:
    if isinstance(exc, ConfigError):
        return CliUsageError(str(exc))
    if isinstance(exc, ServiceError):
        return CliError(exc.message)
    if isinstance(exc, ManageApiError | KeyMismatchError | PidFileError):
        return CliError(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return CliError(f"{exc.strerror}{where}")
    return CliError(f"{type(exc).__name__}: {exc}")


@click.group(cls=ProxyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llm-proxy")
@click.option(
    "--debug", is_flag=True, help="Show tracebacks instead of one-line errors."
)
def main(debug: bool) -> None:
    """llm-proxy: a transparent OpenAI proxy with short-lived withering tokens."""


def compact(value: Any) -> str:
    """A one-line rendering of a JSON value."""
    return orjson.dumps(value).decode() if not isinstance(value, str) else value


def echo_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def upstream_key(non_interactive: bool) -> str:
    """A project's upstream key: OPENAI_API_KEY, else a hidden prompt on a terminal."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if non_interactive or not sys.stdin.isatty():
        why = (
            "--non-interactive" if non_interactive else "standard input is no terminal"
        )
        fail(
            "the project's upstream key comes from OPENAI_API_KEY "
            "(export OPENAI_API_KEY=sk-...; it is never a flag) or, in a terminal, "
            f"from a hidden prompt ({why}, so no prompt)",
            2,
        )
    value: str = click.prompt("Upstream API key (hidden)", hide_input=True)
    return value.strip()
