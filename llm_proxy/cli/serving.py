"""`serve`, `server start|stop|status|health` and `db migrate|status`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from ..app import master_key
from ..config import (
    Settings,
    parse_listen_addr,
)
from ..logs import configure_logging
from ..repository import create_repository
from ..server import (
    DEFAULT_LOG_FILE,
    DEFAULT_PID_FILE,
    base_url_for,
    fetch_health,
    remove_pid_file,
    running_pid,
    spawn_detached,
    stop_process,
    tail,
    wait_until_healthy,
)
from .base import (
    DAEMON_START_TIMEOUT_S,
    DEFAULT_MANAGE_URL,
    EXIT_NOT_RUNNING,
    SERVE_FLAGS,
    F,
    compact,
    dotenv_environ,
    fail,
    load_settings,
    main,
    run,
)

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
            type=int,
            default=1,
            show_default=True,
            help="Reserved; one process for now.",
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
    workers: int,
    daemon: bool,
    pid_file: Path | None,
    log_file: Path,
    **flags: Any,
) -> None:
    """Run the proxy (foreground until SIGTERM or Ctrl-C, or -d in the background)."""
    settings = load_settings(flags)
    if workers != 1:
        fail("--workers other than 1 is not supported yet", 2)
    if daemon:
        debug = bool(ctx.find_root().params.get("debug"))
        start_daemon(settings, flags, pid_file or DEFAULT_PID_FILE, log_file, debug)
        return  # pragma: no cover - the daemon start runs in real-process tests
    if pid_file is not None and (pid := running_pid(pid_file)) is not None:
        fail(f"already running with PID {pid} ({pid_file})")
    configure_logging(settings.log_level, settings.log_format)
    from ..server import serve as run_server

    try:
        run_server(settings, pid_file)
    except OSError as exc:
        fail(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: "
            f"{exc.strerror}"
        )


def daemon_argv(flags: Mapping[str, Any], pid_file: Path, debug: bool) -> list[str]:
    """The command line of the detached child: `serve` in the foreground."""
    argv = [sys.executable, "-m", "llm_proxy"]
    if debug:
        argv.append("--debug")
    argv += ["serve", "--pid-file", str(pid_file.absolute())]
    for name, value in flags.items():
        if name in SERVE_FLAGS and value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def start_daemon(
    settings: Settings,
    flags: Mapping[str, Any],
    pid_file: Path,
    log_file: Path,
    debug: bool,
) -> None:
    """Re-spawn `serve` detached and wait until it answers `/health`."""
    if (pid := running_pid(pid_file)) is not None:
        fail(f"already running with PID {pid} ({pid_file})")
    _spawn_and_wait(settings, daemon_argv(flags, pid_file, debug), pid_file, log_file)


def _spawn_and_wait(
    settings: Settings, argv: list[str], pid_file: Path, log_file: Path
) -> None:  # pragma: no cover - runs in tests/test_server_process.py (real processes)
    process = spawn_detached(argv, log_file.absolute())
    url = base_url_for(settings.listen_host, settings.listen_port)
    healthy = run(
        wait_until_healthy(url, DAEMON_START_TIMEOUT_S, lambda: process.poll() is None)
    )
    if process.poll() is not None:
        fail(
            f"the server exited at start (code {process.returncode}):\n{tail(log_file)}"
        )
    if not healthy:
        click.echo(f"started PID {process.pid}; {url}/health does not answer yet")
        return
    click.echo(f"llm-proxy running in the background: PID {process.pid}, {url}")
    click.echo(f"log: {log_file}   stop: llm-proxy server stop --pid-file {pid_file}")


@main.group()
def server() -> None:
    """Operate a proxy process: start, stop, status, health."""


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
def server_health(url: str | None) -> None:
    """Call /health and /ready; exit non-zero when the server is down or not ready."""
    base = url or _local_url(dotenv_environ())
    try:
        health_status, health = run(fetch_health(base, "/health"))
        ready_status, ready = run(fetch_health(base, "/ready"))
    except (OSError, TimeoutError) as exc:
        fail(f"{base} is down: {exc}")
    click.echo(f"health: {health_status} {compact(health)}")
    click.echo(f"ready:  {ready_status} {compact(ready)}")
    if health_status != 200 or ready_status != 200:
        sys.exit(1)


def _local_url(environ: Mapping[str, str]) -> str:
    raw = environ.get("LISTEN_ADDR", "").strip()
    if not raw:
        return DEFAULT_MANAGE_URL
    host, port = parse_listen_addr(raw)
    return base_url_for(host, port)


# -- db ------------------------------------------------------------------------------


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
    settings = load_settings({"database_url": database_url})
    master_key(settings)

    async def run_work() -> Any:
        repository = create_repository(settings.database_url)
        await repository.connect()
        try:
            return await work(repository)
        finally:
            await repository.close()

    return run(run_work())
