"""The `llm-proxy` command line (click): serve, server, setup, manage, db, openai, bench.

Settings rule: built-in defaults < `.env` in the working directory < environment <
command-line flags. Flags are mapped onto the environment variable names and passed as
`overrides` to `Settings.from_env`, so there is one parser and one set of messages.
Secrets (ENCRYPTION_KEY, upstream keys) are never flags: they would show in the process
list. The one exception is `manage --management-token`, which the issue asks for; its
help points to the MANAGEMENT_TOKEN variable (read from the environment or `.env`).

Exit codes: 0 ok, 1 failure (an API error, a server that is down), 2 usage or
configuration error, 3 `server status` found no running server. Errors are one line on
stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import orjson

from . import __version__
from .app import master_key
from .config import (
    DEFAULT_DATABASE_URL,
    ConfigError,
    Settings,
    environ_with_dotenv,
    parse_listen_addr,
)
from .crypto import KeyCipher, TokenHasher
from .logs import configure_logging
from .manage_client import ManageApiError, ManageClient
from .repository import create_repository
from .server import (
    DEFAULT_LOG_FILE,
    DEFAULT_PID_FILE,
    PidFileError,
    base_url_for,
    fetch_health,
    remove_pid_file,
    running_pid,
    spawn_detached,
    stop_process,
    tail,
    wait_until_healthy,
)
from .services import (
    KeyMismatchError,
    ManagementService,
    NewToken,
    ServiceError,
    check_encryption_key,
)
from .tokens import TokenStore

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEFAULT_MANAGE_URL = "http://localhost:8080"
DAEMON_START_TIMEOUT_S = 15.0
EXIT_NOT_RUNNING = 3

SERVE_FLAGS: Mapping[str, str] = {
    "listen_addr": "LISTEN_ADDR",
    "database_url": "DATABASE_URL",
    "openai_api_url": "OPENAI_API_URL",
    "api_config_path": "API_CONFIG_PATH",
    "log_level": "LOG_LEVEL",
    "log_format": "LOG_FORMAT",
    "file_event_log": "FILE_EVENT_LOG",
}


class CliError(click.ClickException):
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
    from .server import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


def dotenv_environ() -> dict[str, str]:
    """The environment over `.env` of the working directory."""
    return environ_with_dotenv(os.environ, Path(".env"))


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from `.env`, the environment and the given flag values."""
    overrides = {
        SERVE_FLAGS[name]: str(value)
        for name, value in (flags or {}).items()
        if name in SERVE_FLAGS and value is not None
    }
    return Settings.from_env(dotenv_environ(), overrides=overrides)


class ProxyGroup(click.Group):
    """The root group: expected failures become one line unless `--debug`."""

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
    from .server import serve as run_server

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
    click.echo(f"health: {health_status} {_compact(health)}")
    click.echo(f"ready:  {ready_status} {_compact(ready)}")
    if health_status != 200 or ready_status != 200:
        sys.exit(1)


def _local_url(environ: Mapping[str, str]) -> str:
    raw = environ.get("LISTEN_ADDR", "").strip()
    if not raw:
        return DEFAULT_MANAGE_URL
    host, port = parse_listen_addr(raw)
    return base_url_for(host, port)


def _compact(value: Any) -> str:
    return orjson.dumps(value).decode() if not isinstance(value, str) else value


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


# -- setup ---------------------------------------------------------------------------


@main.command()
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".env"),
    show_default=True,
    help="Where to write the settings.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing env file.")
@click.option(
    "--non-interactive", is_flag=True, help="Take every value from flags; no prompts."
)
@click.option("--listen-addr", default="127.0.0.1:8080", show_default=True)
@click.option("--database-url", default=DEFAULT_DATABASE_URL, show_default=True)
@click.option("--openai-api-url", default="https://api.openai.com", show_default=True)
@click.option(
    "--project",
    help="Create a first project with this name (upstream key from OPENAI_API_KEY "
    "or a hidden prompt).",
)
@click.option(
    "--token-minutes",
    type=click.IntRange(1),
    default=24 * 60,
    show_default=True,
    help="Lifetime of the first token.",
)
def setup(
    env_file: Path,
    force: bool,
    non_interactive: bool,
    listen_addr: str,
    database_url: str,
    openai_api_url: str,
    project: str | None,
    token_minutes: int,
) -> None:
    """Write a .env, create the database, optionally a first project and token."""
    if env_file.exists() and not force:
        fail(f"{env_file} exists; use --force to overwrite it", 2)
    if not non_interactive:
        listen_addr = click.prompt("Listen address", default=listen_addr)
        database_url = click.prompt("Database URL", default=database_url)
        openai_api_url = click.prompt("Upstream API URL", default=openai_api_url)
        project = (
            click.prompt(
                "First project name (empty: none)",
                default=project or "",
                show_default=False,
            ).strip()
            or None
        )
    api_key = None
    if project:
        api_key = _upstream_key(non_interactive)
    values = {
        "MANAGEMENT_TOKEN": secrets.token_urlsafe(32),
        "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        "LISTEN_ADDR": listen_addr,
        "DATABASE_URL": database_url,
        "OPENAI_API_URL": openai_api_url,
    }
    Settings.from_env(values)  # validate before writing anything
    write_env_file(env_file, values)
    click.echo(f"wrote {env_file} (mode 0600)")
    created = run(
        prepare_database(Settings.from_env(values), project, api_key, token_minutes)
    )
    click.echo(f"database ready: {database_url}")
    if created is not None:
        click.echo(f"project {project!r} created: {created.token.project_id}")
        click.echo(f"token (shown once, valid {token_minutes} min): {created.value}")
    _warn_overridden(values)
    click.echo("next: llm-proxy serve")


async def prepare_database(
    settings: Settings, project: str | None, api_key: str | None, token_minutes: int
) -> NewToken | None:
    """Create and migrate the database; with a project name, a project and a token."""
    key = master_key(settings)
    repository = create_repository(settings.database_url)
    await repository.connect()
    try:
        await repository.migrate()
        cipher = KeyCipher(key)
        await check_encryption_key(repository, cipher)
        if project is None or api_key is None:
            return None
        hasher = TokenHasher(key)
        service = ManagementService(
            repository, cipher, hasher, TokenStore(hasher, cipher)
        )
        created = await service.create_project(name=project, api_key=api_key)
        return await service.create_token(
            project_id=created.id, duration_minutes=token_minutes
        )
    finally:
        await repository.close()


def _upstream_key(non_interactive: bool) -> str:
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if non_interactive:
        fail("--project needs the upstream key in OPENAI_API_KEY", 2)
    value: str = click.prompt("Upstream API key (hidden)", hide_input=True)
    return value.strip()


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """Write KEY=VALUE lines with mode 0600 from the first byte."""
    text = "# written by `llm-proxy setup`; keep it secret\n" + "".join(
        f"{key}={value}\n" for key, value in values.items()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def _warn_overridden(values: Mapping[str, str]) -> None:
    shadowed = sorted(name for name in values if name in os.environ)
    if shadowed:
        click.secho(
            "note: set in the environment, which wins over the env file: "
            + ", ".join(shadowed),
            fg="yellow",
            err=True,
        )


# -- manage --------------------------------------------------------------------------


class ManageTarget:
    """Where the management API is and the token for it (token checked on use)."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url
        self._token = token

    def client(self) -> ManageClient:
        """A client for one command."""
        if not self._token:
            fail(
                "no management token: set MANAGEMENT_TOKEN (environment or .env) "
                "or pass --management-token",
                2,
            )
        return ManageClient(self.base_url, self._token)


def json_option(function: F) -> F:
    """`--json`: print the API's JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(function)


@main.group()
@click.option(
    "--manage-api-base-url",
    envvar="MANAGE_API_BASE_URL",
    help=f"Base URL of the proxy (env MANAGE_API_BASE_URL; default {DEFAULT_MANAGE_URL}).",
)
@click.option(
    "--management-token",
    help="Prefer the MANAGEMENT_TOKEN variable (environment or .env): flags are "
    "visible in the process list.",
)
@click.pass_context
def manage(
    ctx: click.Context, manage_api_base_url: str | None, management_token: str | None
) -> None:
    """Projects and tokens through the management API of a running proxy."""
    environ = dotenv_environ()
    base_url = (
        manage_api_base_url or environ.get("MANAGE_API_BASE_URL") or DEFAULT_MANAGE_URL
    )
    token = management_token or environ.get("MANAGEMENT_TOKEN")
    ctx.obj = ManageTarget(base_url, token)


def call_api(
    ctx: click.Context, work: Callable[[ManageClient], Coroutine[Any, Any, T]]
) -> T:
    """Run `work` with a management client."""
    target: ManageTarget = ctx.find_object(ManageTarget)  # type: ignore[assignment]
    client = target.client()

    async def go() -> T:
        async with client as api:
            return await work(api)

    return run(go())


def echo_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def echo_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A plain aligned table."""
    cells = [list(headers)] + [
        ["" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )


def echo_fields(item: Mapping[str, Any]) -> None:
    """`key: value` lines for one object."""
    width = max(len(k) for k in item)
    for key, value in item.items():
        shown = _compact(value) if isinstance(value, dict | list) else value
        click.echo(f"{key.ljust(width)}  {'' if shown is None else shown}")


@manage.group()
def project() -> None:
    """Projects: list, get, create, update, delete."""


@project.command("list")
@click.option("--search", help="Only names containing this text.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@click.pass_context
def project_list(
    ctx: click.Context, search: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """List projects."""
    items, total = call_api(
        ctx, lambda api: api.list_projects(limit=limit, offset=offset, search=search)
    )
    if as_json:
        echo_json(items)
        return
    rows = [
        (
            p["project_id"],
            p["name"],
            _yes(p["is_active"]),
            p["api_key_hint"],
            p["created_at"],
        )
        for p in items
    ]
    echo_table(rows, ("ID", "NAME", "ACTIVE", "KEY", "CREATED"))
    click.echo(f"{len(items)} of {total} projects")


@project.command("get")
@click.argument("project_id")
@json_option
@click.pass_context
def project_get(ctx: click.Context, project_id: str, as_json: bool) -> None:
    """Show one project."""
    item = call_api(ctx, lambda api: api.get_project(project_id))
    echo_json(item) if as_json else echo_fields(item)


@project.command("create")
@click.option("--name", required=True)
@click.option("--description")
@click.option("--metadata", help="A JSON object.")
@json_option
@click.pass_context
def project_create(
    ctx: click.Context,
    name: str,
    description: str | None,
    metadata: str | None,
    as_json: bool,
) -> None:
    """Create a project; its upstream key comes from OPENAI_API_KEY or a hidden prompt."""
    meta = _json_object(metadata, "--metadata")
    api_key = _upstream_key(non_interactive=False)
    item = call_api(
        ctx,
        lambda api: api.create_project(
            name=name, api_key=api_key, description=description, metadata=meta
        ),
    )
    echo_json(item) if as_json else echo_fields(item)


@project.command("update")
@click.argument("project_id")
@click.option("--name")
@click.option("--description")
@click.option("--metadata", help="A JSON object (replaces the old one).")
@click.option("--active/--inactive", default=None, help="Enable or disable.")
@click.option(
    "--rotate-key",
    is_flag=True,
    help="Replace the upstream key (from OPENAI_API_KEY or a hidden prompt).",
)
@json_option
@click.pass_context
def project_update(
    ctx: click.Context,
    project_id: str,
    name: str | None,
    description: str | None,
    metadata: str | None,
    active: bool | None,
    rotate_key: bool,
    as_json: bool,
) -> None:
    """Change a project's fields."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if description is not None:
        changes["description"] = description
    if metadata is not None:
        changes["metadata"] = _json_object(metadata, "--metadata")
    if active is not None:
        changes["is_active"] = active
    if rotate_key:
        changes["openai_api_key"] = _upstream_key(non_interactive=False)
    if not changes:
        raise click.UsageError("nothing to change: give at least one option")
    item = call_api(ctx, lambda api: api.update_project(project_id, changes))
    echo_json(item) if as_json else echo_fields(item)


@project.command("delete")
@click.argument("project_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def project_delete(ctx: click.Context, project_id: str, yes: bool) -> None:
    """Delete a project and all of its tokens."""
    if not yes:
        click.confirm(f"Delete project {project_id} and its tokens?", abort=True)
    call_api(ctx, lambda api: api.delete_project(project_id))
    click.echo(f"deleted project {project_id}")


@manage.group()
def token() -> None:
    """Tokens: generate, list, get, revoke."""


@token.command("generate")
@click.option("--project-id", required=True)
@click.option(
    "--duration-minutes", type=click.IntRange(1), default=24 * 60, show_default=True
)
@click.option("--max-requests", type=click.IntRange(1), help="Request budget.")
@click.option("--rate-limit-per-hour", type=click.IntRange(1))
@json_option
@click.pass_context
def token_generate(
    ctx: click.Context,
    project_id: str,
    duration_minutes: int,
    max_requests: int | None,
    rate_limit_per_hour: int | None,
    as_json: bool,
) -> None:
    """Mint a token (its value is shown only now)."""
    item = call_api(
        ctx,
        lambda api: api.create_token(
            project_id=project_id,
            duration_minutes=duration_minutes,
            max_requests=max_requests,
            rate_limit_per_hour=rate_limit_per_hour,
        ),
    )
    echo_json(item) if as_json else echo_fields(item)


@token.command("list")
@click.option("--project-id")
@click.option("--active/--inactive", default=None, help="Only live or only dead ones.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@json_option
@click.pass_context
def token_list(
    ctx: click.Context,
    project_id: str | None,
    active: bool | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List tokens, newest first (never their values)."""
    items, total = call_api(
        ctx,
        lambda api: api.list_tokens(
            project_id=project_id, active=active, limit=limit, offset=offset
        ),
    )
    if as_json:
        echo_json(items)
        return
    rows = [
        (
            t["token_id"],
            t["project_id"],
            "..." + t["token_hint"],
            _yes(t["is_active"]),
            t["expires_at"],
            f"{t['request_count']}/{t['max_requests'] or '-'}",
            t["rate_limit_per_hour"] or "-",
        )
        for t in items
    ]
    headers = ("ID", "PROJECT", "TOKEN", "ACTIVE", "EXPIRES", "REQUESTS", "PER HOUR")
    echo_table(rows, headers)
    click.echo(f"{len(items)} of {total} tokens")


@token.command("get")
@click.argument("token_id")
@json_option
@click.pass_context
def token_get(ctx: click.Context, token_id: str, as_json: bool) -> None:
    """Show one token."""
    item = call_api(ctx, lambda api: api.get_token(token_id))
    echo_json(item) if as_json else echo_fields(item)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke a token (it stops working at once)."""
    call_api(ctx, lambda api: api.revoke_token(token_id))
    click.echo(f"revoked token {token_id}")


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _json_object(text: str | None, option: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint=option) from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return value


# -- openai chat ---------------------------------------------------------------------


@main.group()
def openai() -> None:
    """Talk to the OpenAI API through the proxy."""


@openai.command("chat")
@click.option(
    "--token", envvar="LLM_PROXY_TOKEN", help="Proxy token (env LLM_PROXY_TOKEN)."
)
@click.option("--model", default="gpt-4o-mini", show_default=True)
@click.option("--system", help="A system message for the conversation.")
@click.option("--no-stream", is_flag=True, help="Wait for the whole answer.")
@click.option("--base-url", default=DEFAULT_MANAGE_URL, show_default=True)
def openai_chat(
    token: str | None, model: str, system: str | None, no_stream: bool, base_url: str
) -> None:
    """Chat through the proxy: one line per message, /exit or end of input to stop."""
    from .chat import ChatError, ChatOptions, chat

    if not token:
        fail("no token: pass --token or set LLM_PROXY_TOKEN", 2)
    options = ChatOptions(base_url, token, model, system, stream=not no_stream)
    prompt = "> " if sys.stdin.isatty() else ""
    try:
        run(chat(options, prompt=prompt))
    except ChatError as exc:
        fail(str(exc))


# -- bench ---------------------------------------------------------------------------


@main.command()
@click.option("--base-url", default=DEFAULT_MANAGE_URL, show_default=True)
@click.option("--endpoint", default="/v1/chat/completions", show_default=True)
@click.option(
    "--token", envvar="LLM_PROXY_TOKEN", help="Proxy token (env LLM_PROXY_TOKEN)."
)
@click.option(
    "-r",
    "--requests",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Requests per target.",
)
@click.option(
    "-c", "--concurrency", type=click.IntRange(1), default=10, show_default=True
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Run for this many seconds instead of a count.",
)
@click.option("--method", default="POST", show_default=True)
@click.option("--body", help="Request body (default: a small chat completion).")
@click.option(
    "--body-file", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--stream", is_flag=True, help="Ask for SSE; report TTFB and chunk gaps.")
@click.option(
    "--warmup",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Unmeasured requests per target first.",
)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--compare-url", help="A second base URL loaded alternately (baseline).")
@click.option(
    "--mock",
    is_flag=True,
    help="Start a fake upstream and a proxy on loopback and bench those.",
)
@click.option(
    "--compare-direct",
    is_flag=True,
    help="With --mock: compare against the fake upstream directly.",
)
def bench(
    base_url: str,
    endpoint: str,
    token: str | None,
    requests: int,
    concurrency: int,
    duration: float | None,
    method: str,
    body: str | None,
    body_file: Path | None,
    stream: bool,
    warmup: int,
    timeout: float,
    as_json: bool,
    compare_url: str | None,
    mock: bool,
    compare_direct: bool,
) -> None:
    """Measure latency and throughput of the proxy (or any OpenAI-like URL)."""
    from .bench import BenchOptions, default_body

    if body is not None and body_file is not None:
        raise click.UsageError("give --body or --body-file, not both")
    if compare_direct and not mock:
        raise click.UsageError("--compare-direct needs --mock")
    payload = body.encode() if body is not None else None
    if body_file is not None:
        payload = body_file.read_bytes()
    if payload is None and method.upper() in {"POST", "PUT", "PATCH"}:
        payload = default_body(stream)
    options = BenchOptions(
        base_url=base_url,
        endpoint=endpoint,
        token=token,
        method=method.upper(),
        body=payload,
        requests=requests,
        concurrency=concurrency,
        duration_s=duration,
        stream=stream,
        warmup=warmup,
        timeout_s=timeout,
        compare_url=compare_url,
    )
    report = run(_bench(options, mock, compare_direct, as_json))
    if as_json:
        echo_json(report.to_json())
    else:
        from .bench_report import render_text

        click.echo(render_text(report))


async def _bench(options: Any, mock: bool, compare_direct: bool, as_json: bool) -> Any:
    from dataclasses import replace

    from .bench import mock_targets, progress_printer, run_bench

    progress = None
    if not as_json and sys.stderr.isatty():  # pragma: no cover - needs a terminal
        progress = progress_printer(options.duration_s, _write_err)
    if not mock:
        return await run_bench(options, progress)
    async with mock_targets() as targets:
        options = replace(
            options,
            base_url=targets.proxy_url,
            token=targets.token,
            compare_url=targets.upstream_url if compare_direct else options.compare_url,
        )
        return await run_bench(options, progress)


def _write_err(text: str) -> None:  # pragma: no cover - needs a terminal
    sys.stderr.write(text)
    sys.stderr.flush()


# -- hidden helpers ------------------------------------------------------------------


@main.command("fake-upstream", hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8090, show_default=True)
@click.option("--chunk-delay", type=float, default=0.0, show_default=True)
def fake_upstream(host: str, port: int, chunk_delay: float) -> None:
    """Serve the fake OpenAI upstream (tests, bench --mock, demos)."""
    from .server import run_fake_upstream

    run_fake_upstream(host, port, chunk_delay)  # pragma: no cover - child process


# -- event dispatcher ---------------------------------------------------------------


@main.command()
@click.option(
    "--service",
    type=click.Choice(["file", "helicone", "lunary", "http"]),
    required=True,
    help="Where to deliver events.",
)
@click.option(
    "--endpoint",
    help="file: the JSONL path; http: the URL (LOGGING_URL); helicone/lunary: "
    "override the API base URL.",
)
@click.option(
    "--api-key",
    envvar="DISPATCHER_API_KEY",
    show_envvar=True,
    help="Backend credential; prefer the DISPATCHER_API_KEY variable.",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Events per batch.")
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0.01),
    help="Seconds before a partial batch is sent.",
)
@click.option(
    "--consumer-name",
    help="Stable name in the Redis consumer group (default: host-pid); a restarted "
    "dispatcher with the same name resumes its unacknowledged batch at once.",
)
def dispatcher(
    service: str,
    endpoint: str | None,
    api_key: str | None,
    batch_size: int | None,
    flush_interval: float | None,
    consumer_name: str | None,
) -> None:
    """Deliver events from the Redis bus to one backend until SIGTERM (then drain).

    Each service reads its own consumer group, so several services fan out and several
    processes of one service share the load. Needs LLM_PROXY_EVENT_BUS=redis on the
    proxy and REDIS_URL on both.
    """
    from .dispatchers import run_dispatcher

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    run(
        run_dispatcher(
            settings,
            service,
            endpoint=endpoint,
            api_key=api_key,
            batch_size=batch_size,
            flush_interval_s=flush_interval,
            consumer_name=consumer_name,
        )
    )
