"""`serve`, `server start|stop|status|health` and `db migrate|status|purge`."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from yarl import URL

from ..app import master_key
from ..logs import configure_logging
from ..ops.retention import SCHEMA_VERSION, Cutoffs, Purger, PurgeReport, format_cutoff
from ..server import (
    DEFAULT_LOG_FILE,
    DEFAULT_PID_FILE,
    fetch_health,
    read_pid_file,
    remove_pid_file,
    running_pid,
    stop_process,
)
from ..storage import PurgeCounts, create_repository
from .base import (
    EXIT_NOT_RUNNING,
    F,
    compact,
    dotenv_environ,
    fail,
    load_settings,
    local_url,
    main,
    run,
    settings_environ,
)
from .daemon import owns_listener, start_daemon

# -- serve and server ----------------------------------------------------------------


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
        click.option(
            "--workers",
            help="Worker processes on one port, or auto (CPU count); "
            "more than 1 needs REDIS_URL (WORKERS).",
        ),
        click.option(
            "-d",
            "--daemon",
            is_flag=True,
            help="Start in the background (log to --log-file, PID in --pid-file).",
        ),
        click.option(
            "--pid-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help=f"PID file (default with -d: ./{DEFAULT_PID_FILE}).",
        ),
        click.option(
            "--log-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=DEFAULT_LOG_FILE,
            show_default=True,
            help="Where a daemon's output goes.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def pid_file_option(function: F) -> F:
    """`--pid-file` for the server commands that find a running daemon."""
    return click.option(
        "--pid-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_PID_FILE,
        show_default=True,
        help="PID file written by `serve -d`.",
    )(function)


@main.command()
@settings_options
@click.pass_context
def serve(
    ctx: click.Context,
    /,
    daemon: bool,
    pid_file: Path | None,
    log_file: Path,
    **flags: Any,
) -> None:
    """Run the proxy (foreground until SIGTERM or Ctrl-C, or -d in the background)."""
    settings = load_settings(flags)
    if daemon:
        debug = bool(ctx.find_root().params.get("debug"))
        start_daemon(settings, flags, pid_file or DEFAULT_PID_FILE, log_file, debug)
        return  # pragma: no cover - the daemon start runs in real-process tests
    if pid_file is not None and (pid := running_pid(pid_file)) is not None:
        fail(f"already running with PID {pid} ({pid_file})")
    configure_logging(settings.log_level, settings.log_format)
    from ..server import serve as run_server

    try:
        if settings.workers > 1:
            from ..workers import run_fleet

            sys.exit(run_fleet(settings, settings_environ(flags), pid_file))
        run_server(settings, pid_file)
    except OSError as exc:
        fail(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: "
            f"{exc.strerror}"
        )


@main.group(invoke_without_command=True)
@settings_options
@click.pass_context
def server(ctx: click.Context, /, **params: Any) -> None:
    """Operate a proxy process: start, stop, status, health.

    Without a command, the same as `serve` (`llm-proxy server -d` starts a daemon).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve, **params)
        return
    given = [
        "--" + name.replace("_", "-")
        for name in params
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)} before `{ctx.invoked_subcommand}`: serve options go "
            "to `llm-proxy server start ...` (or `llm-proxy server ...` alone)"
        )


server.add_command(serve, "start")


@server.command("stop")
@pid_file_option
@click.option(
    "--timeout",
    type=float,
    default=40.0,
    show_default=True,
    help="Seconds to wait for a graceful exit.",
)
def server_stop(pid_file: Path, timeout: float) -> None:
    """Send SIGTERM to the PID in the PID file and wait for a graceful exit."""
    pid = running_pid(pid_file)
    if pid is None:
        remove_pid_file(pid_file)
        click.echo("not running")
        return
    if not stop_process(pid, timeout):
        fail(f"PID {pid} did not exit within {timeout:g} s")
    remove_pid_file(pid_file)
    click.echo(f"stopped PID {pid}")


@server.command("status")
@pid_file_option
def server_status(pid_file: Path) -> None:
    """Say whether the server runs (exit 0) or not (exit 3)."""
    pid = running_pid(pid_file)
    if pid is None:
        click.echo("stopped")
        sys.exit(EXIT_NOT_RUNNING)
    click.echo(f"running (PID {pid})")


@server.command("health")
@click.option(
    "--url",
    help="Base URL of the proxy (default: from LISTEN_ADDR, else localhost:8080).",
)
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also check that the PID in this file (written by `serve -d`) is the "
    "process that answers (local servers only).",
)
def server_health(url: str | None, pid_file: Path | None) -> None:
    """Call /health and /ready; exit non-zero when the server is down or not ready."""
    base = url or local_url(dotenv_environ())
    port = _local_port(base) if pid_file is not None else None
    try:
        health_status, health = run(fetch_health(base, "/health"))
        ready_status, ready = run(fetch_health(base, "/ready"))
    except (OSError, TimeoutError) as exc:
        fail(f"{base} is down: {exc}")
    click.echo(f"health: {health_status} {compact(health)}")
    click.echo(f"ready:  {ready_status} {compact(ready)}")
    if pid_file is not None and port is not None:
        _check_listener(base, port, pid_file)
    if health_status != 200 or ready_status != 200:
        sys.exit(1)


def _local_port(base_url: str) -> int:
    """The port of a URL on this machine; a usage error for another host."""
    url = URL(base_url)
    host = (url.host or "").strip("[]")
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local or url.port is None:
        fail(f"--pid-file needs a local URL (localhost or loopback), got {base_url}", 2)
    return url.port


def _check_listener(base_url: str, port: int, pid_file: Path) -> None:
    pid = running_pid(pid_file)
    if pid is None:
        written = read_pid_file(pid_file)
        named = f" (it names PID {written}, which is gone)" if written else ""
        fail(f"no running server in {pid_file}{named}")
    if owns_listener(pid, port) is False:
        fail(f"the server answering at {base_url} is not PID {pid} from {pid_file}")
    click.echo(f"pid:    {pid} listens on {URL(base_url).host}:{port}")


# -- db ------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema and retention: migrate, status, purge."""


@db.command("migrate")
@click.option("--database-url", help="Override DATABASE_URL.")
def db_migrate(database_url: str | None) -> None:
    """Create the database if needed and apply pending migrations (also at start)."""
    settings = load_settings(
        {"database_url": database_url}, needs_management_token=False
    )
    master_key(settings)  # a SQLite database gets its key file with it
    applied = _with_repository(settings.database_url, lambda repo: repo.migrate())
    click.echo(
        f"applied migrations: {applied}" if applied else "database is up to date"
    )


@db.command("status")
@click.option("--database-url", help="Override DATABASE_URL.")
def db_status(database_url: str | None) -> None:
    """Print the schema version of an existing database (creates nothing)."""
    settings = load_settings(
        {"database_url": database_url}, needs_management_token=False
    )
    path = settings.database.sqlite_path
    if path is not None and not path.is_file():
        fail(f"no database at {path} (create it with `llm-proxy db migrate`)")
    version = _with_repository(
        settings.database_url, lambda repo: repo.schema_version()
    )
    click.echo(f"schema version: {version}")


# A purge from the command line runs to the end unless it takes longer than this.
CLI_PURGE_MAX_RUN_S = 3600.0


@db.command("purge")
@click.option("--database-url", help="Override DATABASE_URL.")
@click.option(
    "--dry-run", is_flag=True, help="Only show what would be deleted; change nothing."
)
def db_purge(database_url: str | None, dry_run: bool) -> None:
    """Delete tokens, usage and audit events past their *_RETENTION_DAYS now.

    Tokens go when they expired, or were revoked, before the token cut-off; usage
    and audit events when they are older than their cut-off. Projects are never
    deleted.
    """
    settings = load_settings(
        {"database_url": database_url}, needs_management_token=False
    )
    path = settings.database.sqlite_path
    if path is not None and not path.is_file():
        fail(f"no database at {path} (create it with `llm-proxy db migrate`)")
    retention = settings.retention

    async def purge(repository: Any) -> tuple[Cutoffs, PurgeCounts, Any]:
        version = await repository.schema_version()
        if version < SCHEMA_VERSION:
            fail(
                f"the database schema is version {version}; the purge needs "
                f"{SCHEMA_VERSION} (apply it with `llm-proxy db migrate`)"
            )
        purger = Purger(repository, retention, max_run_s=CLI_PURGE_MAX_RUN_S)
        cutoffs, counts = await purger.preview()
        if dry_run or not cutoffs.any:
            return cutoffs, counts, None
        return cutoffs, counts, await purger.run() or "locked"

    cutoffs, counts, outcome = _with_repository(settings.database_url, purge)
    token_line = _kind_line(
        counts.tokens,
        cutoffs.tokens_before,
        "expired or revoked before",
        f"TOKEN_RETENTION_DAYS={retention.token_days or 'off'}",
    )
    usage_line = _kind_line(
        counts.usage_events,
        cutoffs.usage_before,
        "older than",
        f"USAGE_RETENTION_DAYS={retention.usage_days or 'off'}",
    )
    audit_line = _kind_line(
        counts.audit_events,
        cutoffs.audit_before,
        "older than",
        f"AUDIT_RETENTION_DAYS={retention.audit_days or 'off'}",
    )
    click.echo(f"tokens:       {token_line}")
    click.echo(f"usage events: {usage_line}")
    click.echo(f"audit events: {audit_line}")
    if dry_run:
        click.echo("dry run: nothing deleted")
    elif outcome == "locked":
        fail("another process is purging right now (it holds the purge lock)")
    elif isinstance(outcome, PurgeReport):
        deleted = outcome.deleted
        click.echo(
            f"deleted {deleted.tokens} tokens, {deleted.usage_events} usage events"
            f" and {deleted.audit_events} audit events in {outcome.seconds:.1f} s"
        )
        if not outcome.complete:
            click.echo(f"stopped after {CLI_PURGE_MAX_RUN_S:g} s: run it again")
    else:
        click.echo("retention is off: nothing to delete")


def _kind_line(count: int, before: datetime | None, phrase: str, setting: str) -> str:
    """One kind's line: how many would go, or that retention keeps it forever."""
    if before is None:
        return f"kept forever ({setting})"
    return f"{count} {phrase} {format_cutoff(before)} ({setting})"


def _with_repository(database_url: str, work: Callable[[Any], Any]) -> Any:
    async def run_work() -> Any:
        repository = create_repository(database_url)
        await repository.connect()
        try:
            return await work(repository)
        finally:
            await repository.close()

    return run(run_work())
