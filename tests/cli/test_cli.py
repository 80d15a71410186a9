"""The `llm-proxy` command line through click's CliRunner, against a real proxy.

The proxy and the fake upstream run on real loopback ports in a background thread (the
commands run their own `asyncio.run` on the test's thread), so `manage`, `server
health` and `openai chat` make real HTTP calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from pytest_aiohttp import AiohttpServer

from llm_proxy.app import create_app
from llm_proxy.cli import (
    _as_cli_error,
    _local_url,
    daemon_argv,
    main,
    prepare_database,
)
from llm_proxy.cli.base import run
from llm_proxy.cli.chat import delta_content, message_content
from llm_proxy.cli.daemon import ChildStart, owns_listener, wait_for_child
from llm_proxy.config import ConfigError, Settings
from llm_proxy.devtools.bench_mock import PROXY_ENV_NAMES
from llm_proxy.devtools.fake_upstream import (
    load_fixture,
    split_sse_events,
    start_fake_upstream,
)
from llm_proxy.management.client import ManageApiError, ManageClient, error_message
from llm_proxy.management.service import KeyMismatchError, NotFound
from llm_proxy.server import (
    PidFileError,
    base_url_for,
    fetch_health,
    process_alive,
    read_pid_file,
    remove_pid_file,
    running_pid,
    stop_process,
    tail,
    wait_until_healthy,
    write_pid_file,
)

from ..support import MANAGEMENT_TOKEN, UPSTREAM_KEY

SETTING_NAMES = (
    "MANAGEMENT_TOKEN",
    "DATABASE_URL",
    "OPENAI_API_URL",
    "LISTEN_ADDR",
    "ENCRYPTION_KEY",
    "OPENAI_API_KEY",
    "MANAGE_API_BASE_URL",
    "LLM_PROXY_TOKEN",
    "MANAGEMENT_TOKEN_FILE",
    "ENCRYPTION_KEY_FILE",
    "DATABASE_URL_FILE",
)


@dataclass(frozen=True)
class LiveProxy:
    """A proxy in front of the fake upstream, served from a background thread."""

    url: str
    upstream_url: str
    database_url: str

    def env(self, **extra: str) -> dict[str, str]:
        """What a `manage` command needs to reach this proxy."""
        return {
            "MANAGE_API_BASE_URL": self.url,
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            **extra,
        }


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test runs in an empty directory with no proxy settings inherited."""
    monkeypatch.chdir(tmp_path)
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveProxy]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    database_url = f"sqlite:///{tmp_path / 'live.db'}"

    async def start() -> tuple[list[web.AppRunner], LiveProxy]:
        fake_runner, fake_url = await start_fake_upstream()
        settings = Settings.from_env(
            {
                "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
                "DATABASE_URL": database_url,
                "OPENAI_API_URL": str(fake_url).rstrip("/"),
            }
        )
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        proxy = LiveProxy(
            f"http://127.0.0.1:{port}", str(fake_url).rstrip("/"), database_url
        )
        return [runner, fake_runner], proxy

    runners, proxy = asyncio.run_coroutine_threadsafe(start(), loop).result(15)
    try:
        yield proxy
    finally:

        async def stop() -> None:
            for runner in runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def invoke(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> Result:
    return CliRunner().invoke(main, args, env=env, catch_exceptions=True, **kw)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def json_out(result: Result) -> Any:
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def create_project(live: LiveProxy, name: str = "demo", *extra: str) -> dict[str, Any]:
    result = invoke(
        ["manage", "project", "create", "--name", name, "--json", *extra],
        live.env(OPENAI_API_KEY=UPSTREAM_KEY),
    )
    project: dict[str, Any] = json_out(result)
    return project


def update_project(live: LiveProxy, project_id: str, *extra: str) -> dict[str, Any]:
    args = ["manage", "project", "update", project_id, "--json", *extra]
    project: dict[str, Any] = json_out(invoke(args, live.env()))
    return project


def create_token(live: LiveProxy, project_id: str, *extra: str) -> dict[str, Any]:
    args = ["manage", "token", "generate", "--project-id", project_id, *extra]
    token: dict[str, Any] = json_out(invoke([*args, "--json"], live.env()))
    return token


# -- the group -------------------------------------------------------------------------


def test_cli_help_lists_every_command_but_hidden_ones() -> None:
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in ("serve", "server", "setup", "manage", "db", "openai", "bench"):
        assert command in result.output
    assert "fake-upstream" not in result.output


def test_cli_help_reads_at_every_level() -> None:
    for path in (
        ["manage", "project"],
        ["manage", "token"],
        ["server"],
        ["openai", "chat"],
        ["bench"],
        ["setup"],
    ):
        result = invoke([*path, "--help"])
        assert result.exit_code == 0, path
        assert "Usage:" in result.output


def test_cli_version_prints_the_package_version() -> None:
    from llm_proxy import __version__

    assert __version__ in invoke(["--version"]).output


def test_cli_errors_map_to_one_line_and_exit_codes() -> None:
    assert _as_cli_error(ConfigError("X bad")).exit_code == 2
    assert _as_cli_error(NotFound("gone")).format_message() == "gone"
    assert _as_cli_error(KeyMismatchError("wrong key")).exit_code == 1
    assert _as_cli_error(PidFileError("busy")).format_message() == "busy"
    error = _as_cli_error(FileNotFoundError(2, "No such file", "x.yaml"))
    assert error.format_message() == "No such file (x.yaml)"
    assert _as_cli_error(RuntimeError("boom")).format_message() == "RuntimeError: boom"


# -- db and serve ----------------------------------------------------------------------


def test_db_migrate_then_status_reports_the_schema_version(tmp_path: Path) -> None:
    env = {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    first = invoke(["db", "migrate"], env)
    assert first.exit_code == 0 and "applied migrations" in first.output
    again = invoke(["db", "migrate"], env)
    assert "database is up to date" in again.output
    status = invoke(["db", "status"], env)
    assert status.exit_code == 0 and "schema version: " in status.output


def test_db_status_with_bad_database_url_is_a_usage_error() -> None:
    result = invoke(
        ["db", "status", "--database-url", "mysql://x"],
        {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN},
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: DATABASE_URL must be")
    assert "Traceback" not in result.output


def test_serve_without_management_token_fails_with_one_line() -> None:
    result = invoke(["serve"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: MANAGEMENT_TOKEN is required (at least 16 characters)"
    )


def test_serve_with_a_missing_secret_file_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "secrets" / "management_token"
    result = invoke(["serve"], {"MANAGEMENT_TOKEN_FILE": str(missing)})
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: MANAGEMENT_TOKEN_FILE: '{missing}'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_commands_read_the_database_url_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text(f"sqlite:///{tmp_path / 'from-file.db'}\n")
    env = {"DATABASE_URL_FILE": str(secret), "MANAGEMENT_TOKEN_FILE": "/nowhere"}
    assert invoke(["db", "migrate"], env).exit_code == 0
    assert (tmp_path / "from-file.db").is_file()


def test_serve_refuses_more_than_one_worker() -> None:
    result = invoke(["serve", "--workers", "2"], {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN})
    assert result.exit_code == 2 and "--workers" in result.stderr


def test_serve_refuses_when_the_pid_file_names_a_live_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "proxy.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    env = {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
    for args in (["serve", "-d"], ["server", "start", "--daemon"], ["serve"]):
        result = invoke([*args, "--pid-file", str(pid_file)], env)
        assert result.exit_code == 1, args
        assert f"already running with PID {os.getpid()}" in result.stderr


def test_serve_reports_a_busy_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
            "LOG_LEVEL": "error",
        }
        pid_file = tmp_path / "serve.pid"
        result = invoke(
            [
                "serve",
                "--listen-addr",
                f"127.0.0.1:{port}",
                "--pid-file",
                str(pid_file),
            ],
            env,
        )
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not pid_file.exists()


def test_serve_with_the_wrong_encryption_key_fails_and_debug_shows_it(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'k.db'}"
    key_a = base64.b64encode(b"a" * 32).decode()
    key_b = base64.b64encode(b"b" * 32).decode()
    env = {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "DATABASE_URL": db_url,
        "LOG_LEVEL": "error",
    }
    args = ["serve", "--listen-addr", f"127.0.0.1:{closed_port()}"]
    settings_a = Settings.from_env({**env, "ENCRYPTION_KEY": key_a})
    assert asyncio.run(prepare_database(settings_a, None, None, 1)) is None
    wrong = invoke(args, {**env, "ENCRYPTION_KEY": key_b})
    assert wrong.exit_code == 1
    assert "ENCRYPTION_KEY does not match" in wrong.stderr
    debug = invoke(["--debug", *args], {**env, "ENCRYPTION_KEY": key_b})
    assert isinstance(debug.exception, KeyMismatchError)


def test_daemon_argv_reruns_serve_in_the_foreground(tmp_path: Path) -> None:
    argv = daemon_argv(
        {"listen_addr": ":9000", "database_url": None, "workers": "2"},
        Path("x.pid"),
        debug=True,
    )
    assert argv[:5] == [sys.executable, "-m", "llm_proxy", "--debug", "serve"]
    assert argv[5:7] == ["--pid-file", str(tmp_path / "x.pid")]
    assert argv[7:] == ["--listen-addr", ":9000", "--workers", "2"]


# -- server stop | status | health -----------------------------------------------------


def test_server_status_says_stopped_with_exit_3_without_a_pid_file() -> None:
    result = invoke(["server", "status"])
    assert result.exit_code == 3 and result.output.strip() == "stopped"


def test_server_status_says_running_for_a_live_pid(tmp_path: Path) -> None:
    pid_file = tmp_path / "run.pid"
    pid_file.write_text(str(os.getpid()))
    result = invoke(["server", "status", "--pid-file", str(pid_file)])
    assert result.exit_code == 0
    assert result.output.strip() == f"running (PID {os.getpid()})"


def test_server_stop_without_a_server_says_so_and_removes_a_stale_file(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text("999999999\n")
    result = invoke(["server", "stop", "--pid-file", str(pid_file)])
    assert result.exit_code == 0 and result.output.strip() == "not running"
    assert not pid_file.exists()


def test_server_stop_terminates_the_process_and_removes_the_pid_file(
    tmp_path: Path,
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = tmp_path / "child.pid"
        pid_file.write_text(str(child.pid))
        result = invoke(["server", "stop", "--pid-file", str(pid_file)])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"stopped PID {child.pid}"
        assert child.wait(5) == -signal.SIGTERM
        assert not pid_file.exists()
    finally:
        child.kill()
        child.wait()


def test_server_stop_gives_up_after_the_timeout(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            pid_file = tmp_path / "stubborn.pid"
            pid_file.write_text(str(child.pid))
            args = ["server", "stop", "--pid-file", str(pid_file), "--timeout", "0.2"]
            result = invoke(args)
            assert result.exit_code == 1
            assert f"PID {child.pid} did not exit within 0.2 s" in result.stderr
            assert pid_file.exists()
        finally:
            child.kill()


def test_server_health_reports_health_and_ready(live: LiveProxy) -> None:
    result = invoke(["server", "health", "--url", live.url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith('health: 200 {"status":"ok"')
    assert lines[1].startswith('ready:  200 {"status":"ready"')


def test_server_health_finds_the_url_from_listen_addr(live: LiveProxy) -> None:
    port = live.url.rsplit(":", 1)[1]
    Path(".env").write_text(f"LISTEN_ADDR=0.0.0.0:{port}\n")
    assert invoke(["server", "health"]).exit_code == 0


def test_server_health_fails_when_the_server_is_down() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = invoke(["server", "health", "--url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {url} is down")


def test_server_health_fails_when_an_endpoint_is_not_200(live: LiveProxy) -> None:
    result = invoke(["server", "health", "--url", live.upstream_url])
    assert result.exit_code == 1
    assert result.output.startswith("health: 404 ")


def test_pid_file_helpers_handle_garbage_and_other_owners(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    assert read_pid_file(pid_file) is None
    pid_file.write_text("not a pid")
    assert read_pid_file(pid_file) is None and running_pid(pid_file) is None
    write_pid_file(pid_file, 12345)
    assert read_pid_file(pid_file) == 12345
    remove_pid_file(pid_file, pid=54321)
    assert pid_file.exists()
    pid_file.write_text(str(os.getpid()))
    with pytest.raises(PidFileError, match="names running process"):
        write_pid_file(pid_file, 12345)
    assert process_alive(1)  # init: another owner, still alive
    assert stop_process(999999999, 1.0)
    assert tail(tmp_path / "missing.log").startswith("(")
    assert base_url_for("::", 80) == "http://[::1]:80"
    assert base_url_for("0.0.0.0", 81) == "http://127.0.0.1:81"


# -- setup -----------------------------------------------------------------------------


def test_setup_non_interactive_writes_env_and_database(tmp_path: Path) -> None:
    db_path = tmp_path / "data" / "proxy.db"
    result = invoke(
        [
            "setup",
            "--non-interactive",
            "--database-url",
            f"sqlite:///{db_path}",
            "--listen-addr",
            "127.0.0.1:9191",
            "--openai-api-url",
            "http://127.0.0.1:9",
        ]
    )
    assert result.exit_code == 0, result.output + result.stderr
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(
        line.split("=", 1)
        for line in env_file.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert len(values["MANAGEMENT_TOKEN"]) >= 32
    assert len(base64.b64decode(values["ENCRYPTION_KEY"])) == 32
    assert values["LISTEN_ADDR"] == "127.0.0.1:9191"
    assert db_path.exists()
    assert result.output.rstrip().endswith("next: llm-proxy serve")
    assert "token" not in result.output
    status = invoke(["db", "status"])  # reads the new .env
    assert status.exit_code == 0 and "schema version" in status.output


def test_setup_refuses_to_overwrite_without_force() -> None:
    Path(".env").write_text("KEEP=1\n")
    result = invoke(["setup", "--non-interactive"])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert Path(".env").read_text() == "KEEP=1\n"


def test_setup_with_a_project_creates_it_and_prints_the_token_once(
    tmp_path: Path, live: LiveProxy
) -> None:
    result = invoke(
        [
            "setup",
            "--non-interactive",
            "--force",
            "--database-url",
            live.database_url,
            "--project",
            "first",
            "--token-minutes",
            "30",
        ],
        {"OPENAI_API_KEY": UPSTREAM_KEY, "LISTEN_ADDR": "127.0.0.1:1"},
    )
    assert result.exit_code == 1  # the live database was written with another key
    assert "ENCRYPTION_KEY does not match" in result.stderr

    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = invoke(
        ["setup", "--non-interactive", "--force", "--database-url", fresh]
        + ["--project", "first", "--token-minutes", "30"],
        {"OPENAI_API_KEY": UPSTREAM_KEY, "LISTEN_ADDR": "127.0.0.1:1"},
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert "project 'first' created: " in result.output
    token_lines = [ln for ln in result.output.splitlines() if ln.startswith("token")]
    assert len(token_lines) == 1 and "valid 30 min" in token_lines[0]
    assert "LISTEN_ADDR" in result.stderr  # the environment wins over the file
    assert UPSTREAM_KEY not in Path(".env").read_text()


def test_setup_non_interactive_project_needs_the_key_in_the_environment() -> None:
    result = invoke(["setup", "--non-interactive", "--project", "p"])
    assert result.exit_code == 2 and "OPENAI_API_KEY" in result.stderr
    assert not Path(".env").exists()


def test_setup_rejects_bad_values_before_writing(tmp_path: Path) -> None:
    result = invoke(["setup", "--non-interactive", "--listen-addr", "nowhere"])
    assert result.exit_code == 2 and "LISTEN_ADDR" in result.stderr
    assert not Path(".env").exists()


# -- manage ----------------------------------------------------------------------------


def test_manage_project_lifecycle_in_tables_and_json(live: LiveProxy) -> None:
    project = create_project(live, "alpha")
    project_id = project["project_id"]
    assert project["api_key_hint"] != UPSTREAM_KEY

    listed = invoke(["manage", "project", "list"], live.env())
    assert listed.exit_code == 0
    assert listed.output.splitlines()[0].split() == [
        "ID",
        "NAME",
        "ACTIVE",
        "KEY",
        "CREATED",
    ]
    assert project_id in listed.output and "1 of 1 projects" in listed.output
    found = json_out(
        invoke(["manage", "project", "list", "--search", "alp", "--json"], live.env())
    )
    assert [p["name"] for p in found] == ["alpha"]

    shown = invoke(["manage", "project", "get", project_id], live.env())
    assert shown.output.splitlines()[0].split() == ["project_id", project_id]

    updated = json_out(
        invoke(
            ["manage", "project", "update", project_id, "--name", "beta"]
            + ["--description", "d", "--metadata", '{"team": "x"}', "--inactive"]
            + ["--rotate-key", "--json"],
            live.env(OPENAI_API_KEY="sk-another-key-0123456789"),
        )
    )
    assert (updated["name"], updated["is_active"], updated["metadata"]) == (
        "beta",
        False,
        {"team": "x"},
    )
    assert updated["api_key_hint"] != project["api_key_hint"]
    human = invoke(["manage", "project", "update", project_id, "--active"], live.env())
    assert human.exit_code == 0 and "is_active" in human.output

    deleted = invoke(
        ["manage", "project", "delete", project_id], live.env(), input="y\n"
    )
    assert deleted.exit_code == 0 and f"deleted project {project_id}" in deleted.output
    other = create_project(live, "other")["project_id"]
    quiet = invoke(["manage", "project", "delete", other, "--yes"], live.env())
    assert quiet.output.strip() == f"deleted project {other}"
    missing = invoke(["manage", "project", "get", project_id], live.env())
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        f"error: 404 not_found: No project with id '{project_id}'."
    )


def test_manage_project_usage_errors_exit_2(live: LiveProxy) -> None:
    nothing = invoke(["manage", "project", "update", "some-id"], live.env())
    assert nothing.exit_code == 2 and "nothing to change" in nothing.output
    bad_json = invoke(
        ["manage", "project", "create", "--name", "n", "--metadata", "{"],
        live.env(OPENAI_API_KEY=UPSTREAM_KEY),
    )
    assert bad_json.exit_code == 2 and "not JSON" in bad_json.output
    not_object = invoke(
        ["manage", "project", "update", "id", "--metadata", "[1]"], live.env()
    )
    assert not_object.exit_code == 2 and "JSON object" in not_object.output
    declined = invoke(["manage", "project", "delete", "id"], live.env(), input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output


def test_manage_duplicate_project_shows_the_api_message(live: LiveProxy) -> None:
    create_project(live, "twice")
    again = invoke(
        ["manage", "project", "create", "--name", "twice"],
        live.env(OPENAI_API_KEY=UPSTREAM_KEY),
    )
    assert again.exit_code == 1
    assert "409 conflict: A project named 'twice' already exists." in again.stderr


def test_manage_token_lifecycle(live: LiveProxy) -> None:
    project_id = create_project(live)["project_id"]
    token = create_token(
        live,
        project_id,
        "--duration-minutes",
        "5",
        "--max-requests",
        "7",
        "--rate-limit-per-hour",
        "60",
    )
    assert token["token"] and token["max_requests"] == 7
    human = invoke(
        ["manage", "token", "generate", "--project-id", project_id], live.env()
    )
    assert human.exit_code == 0 and "token " in human.output

    table = invoke(["manage", "token", "list", "--project-id", project_id], live.env())
    assert table.exit_code == 0 and "2 of 2 tokens" in table.output
    assert "0/7" in table.output and token["token"] not in table.output
    shown = json_out(
        invoke(["manage", "token", "get", token["token_id"], "--json"], live.env())
    )
    assert shown["token_hint"] == token["token"][-4:]
    assert (
        "token_hint"
        in invoke(["manage", "token", "get", token["token_id"]], live.env()).output
    )

    revoked = invoke(["manage", "token", "revoke", token["token_id"]], live.env())
    assert revoked.exit_code == 0
    dead = json_out(
        invoke(["manage", "token", "list", "--inactive", "--json"], live.env())
    )
    assert [t["token_id"] for t in dead] == [token["token_id"]]
    alive = json_out(
        invoke(["manage", "token", "list", "--active", "--json"], live.env())
    )
    assert token["token_id"] not in [t["token_id"] for t in alive]


def test_manage_token_get_and_revoke_take_a_value_and_refuse_unknown_ones(
    live: LiveProxy,
) -> None:
    project_id = create_project(live)["project_id"]
    token = create_token(live, project_id)
    value = token["token"]
    shown = json_out(invoke(["manage", "token", "get", value, "--json"], live.env()))
    assert shown["token_id"] == token["token_id"] and "token" not in shown
    revoked = invoke(["manage", "token", "revoke", value], live.env())
    assert revoked.exit_code == 0, revoked.output + revoked.stderr
    assert value not in revoked.output  # the value is never echoed back
    assert token["token_id"] in revoked.output
    dead = json_out(
        invoke(["manage", "token", "list", "--inactive", "--json"], live.env())
    )
    assert [t["token_id"] for t in dead] == [token["token_id"]]
    for unknown in ("wt-not-a-real-token", "no-such-token-id"):
        for command in ("get", "revoke"):
            result = invoke(["manage", "token", command, unknown], live.env())
            assert result.exit_code == 1, (command, unknown, result.output)
            assert "404" in result.stderr


def test_manage_token_generate_for_unknown_project_is_an_api_error(
    live: LiveProxy,
) -> None:
    result = invoke(["manage", "token", "generate", "--project-id", "nope"], live.env())
    assert result.exit_code == 1 and "No project with id 'nope'" in result.stderr


def test_manage_with_a_wrong_token_shows_the_api_message(live: LiveProxy) -> None:
    env = {**live.env(), "MANAGEMENT_TOKEN": "wrong-token-0123456789"}
    result = invoke(["manage", "project", "list"], env)
    assert result.exit_code == 1
    assert "401 invalid_management_token: Missing or invalid management token." in (
        result.stderr
    )


def test_manage_reads_the_token_from_dotenv_and_flags_win(live: LiveProxy) -> None:
    Path(".env").write_text(
        f"MANAGEMENT_TOKEN={MANAGEMENT_TOKEN}\nMANAGE_API_BASE_URL=http://127.0.0.1:9\n"
    )
    result = invoke(
        ["manage", "--manage-api-base-url", live.url, "project", "list", "--json"]
    )
    assert json_out(result) == []


def test_manage_reads_the_token_from_a_file(live: LiveProxy, tmp_path: Path) -> None:
    secret = tmp_path / "management_token"
    secret.write_text(f"{MANAGEMENT_TOKEN}\n")
    env = {"MANAGE_API_BASE_URL": live.url, "MANAGEMENT_TOKEN_FILE": str(secret)}
    assert json_out(invoke(["manage", "project", "list", "--json"], env)) == []


def test_manage_without_a_token_is_a_usage_error() -> None:
    result = invoke(["manage", "project", "list"])
    assert result.exit_code == 2 and "no management token" in result.stderr


def test_manage_unreachable_api_is_one_line_and_debug_raises() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    args = [
        "manage",
        "--manage-api-base-url",
        url,
        "--management-token",
        MANAGEMENT_TOKEN,
    ]
    result = invoke([*args, "token", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot reach the management API at {url}")
    assert len(result.stderr.strip().splitlines()) == 1
    debug = invoke(["--debug", *args, "token", "list"])
    assert isinstance(debug.exception, ManageApiError)


async def test_manage_client_needs_its_context_and_reads_odd_errors() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await ManageClient("http://x", "t").get_token("x")
    assert str(error_message(502, b"<html>bad gateway</html>")) == (
        "502: <html>bad gateway</html>"
    )
    assert str(error_message(500, b"")) == "500: no body"


async def test_manage_client_reports_a_timeout(aiohttp_server: AiohttpServer) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response()

    app = web.Application()
    app.router.add_get("/manage/tokens/{token_id}", slow)
    server = await aiohttp_server(app)
    async with ManageClient(str(server.make_url("")), "t", timeout_s=0.05) as api:
        with pytest.raises(ManageApiError, match="timed out"):
            await api.get_token("x")


async def test_health_helpers_read_text_and_give_up(
    aiohttp_server: AiohttpServer,
) -> None:
    async def fine(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/health", fine)
    server = await aiohttp_server(app)
    assert await fetch_health(str(server.make_url(""))) == (200, "fine")
    closed = f"http://127.0.0.1:{closed_port()}"
    assert not await wait_until_healthy(closed, 0.12, lambda: True)
    assert not await wait_until_healthy(closed, 5.0, lambda: False)
    assert _local_url({}) == "http://localhost:8080"
    assert _local_url({"LISTEN_ADDR": ":9"}) == "http://127.0.0.1:9"


# -- openai chat -----------------------------------------------------------------------


def expected_stream_text() -> str:
    events = split_sse_events(load_fixture("chat_stream_no_usage.sse"))
    return "".join(delta_content(e.strip()) or "" for e in events)


def test_openai_chat_streams_the_answer_and_keeps_the_conversation(
    live: LiveProxy,
) -> None:
    project_id = create_project(live)["project_id"]
    token = create_token(live, project_id)["token"]
    result = invoke(
        ["openai", "chat", "--base-url", live.url, "--system", "be brief"],
        {"LLM_PROXY_TOKEN": token},
        input="hello\n\nagain\n/exit\nnot sent\n",
    )
    assert result.exit_code == 0, result.output + result.stderr
    expected = expected_stream_text()
    assert expected and result.output == f"{expected}\n{expected}\n"


def test_openai_chat_no_stream_prints_the_whole_answer(live: LiveProxy) -> None:
    project_id = create_project(live)["project_id"]
    token = create_token(live, project_id)["token"]
    result = invoke(
        ["openai", "chat", "--base-url", live.url, "--token", token, "--no-stream"],
        input="hi\n",
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output == message_content(load_fixture("chat_completion.json")) + "\n"


def test_openai_chat_with_a_bad_token_fails_with_the_proxy_message(
    live: LiveProxy,
) -> None:
    result = invoke(
        ["openai", "chat", "--base-url", live.url, "--token", "bad"], input="hi\n"
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: 401 ")


def test_openai_chat_without_a_token_is_a_usage_error() -> None:
    result = invoke(["openai", "chat"], input="hi\n")
    assert result.exit_code == 2 and "LLM_PROXY_TOKEN" in result.stderr


def test_chat_delta_content_ignores_lines_without_text() -> None:
    assert delta_content(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n') == "hi"
    assert delta_content(b"data: [DONE]\n") is None
    assert delta_content(b": keep-alive\n") is None
    assert delta_content(b"data: {not json}\n") is None
    assert delta_content(b'data: {"choices":[]}\n') is None
    assert delta_content(b'data: {"choices":[{"delta":{"role":"assistant"}}]}') is None
    assert delta_content(b"data:\n") is None


# -- every documented path works as written ---------------------------------------------

COMMAND = [sys.executable, "-m", "llm_proxy"]


def process_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy setting, plus `extra`."""
    drop = PROXY_ENV_NAMES | set(SETTING_NAMES)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


def run_command(
    cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """One command as its own process, stdin closed, the way a script runs it."""
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_in_terminal(
    cwd: Path, env: dict[str, str], args: list[str], answers: list[tuple[str, str]]
) -> tuple[int, str]:
    """Run a command on a pseudo-terminal; type each answer once its prompt shows.

    The child gets a session of its own, so no prompt can reach the terminal that
    runs the tests; it reads the pseudo-terminal as its standard input.
    """
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*COMMAND, *args],
        cwd=cwd,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output, pending, searched_from = b"", list(answers), 0
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0].encode() in output[searched_from:]:
                os.write(master, pending.pop(0)[1].encode() + b"\n")
                searched_from = len(output)
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                output += chunk
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return code, output.decode(errors="replace")


@pytest.fixture
def reap_daemon(tmp_path: Path) -> Iterator[None]:
    """Whatever a test does, no daemon outlives it."""
    yield
    pid = read_pid_file(tmp_path / "llm-proxy.pid")
    if pid is not None and process_alive(pid):
        os.kill(pid, signal.SIGKILL)


def daemon_env(tmp_path: Path, port: int) -> dict[str, str]:
    return process_env(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        DATABASE_URL=f"sqlite:///{tmp_path / 'daemon.db'}",
        OPENAI_API_URL=f"http://127.0.0.1:{closed_port()}",
        LISTEN_ADDR=f"127.0.0.1:{port}",
        LOG_FORMAT="text",
    )


def test_serve_d_on_a_port_another_server_answers_fails_with_the_child_log(
    live: LiveProxy, tmp_path: Path, reap_daemon: None
) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    result = run_command(tmp_path, daemon_env(tmp_path, port), "serve", "-d")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "running in the background" not in result.stdout
    assert "the server exited at start" in result.stderr
    assert "address already in use" in result.stderr  # the tail of the child's log
    assert not (tmp_path / "llm-proxy.pid").exists()


def test_server_d_as_the_seed_writes_it_starts_a_daemon_that_owns_its_port(
    tmp_path: Path, reap_daemon: None
) -> None:
    port = closed_port()
    env = daemon_env(tmp_path, port)
    started = run_command(tmp_path, env, "server", "-d")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = read_pid_file(tmp_path / "llm-proxy.pid")
    assert pid is not None and f"PID {pid}" in started.stdout
    assert owns_listener(pid, port) is True
    health = run_command(
        tmp_path, env, "server", "health", "--pid-file", "llm-proxy.pid"
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert f"pid:    {pid} listens on 127.0.0.1:{port}" in health.stdout
    stopped = run_command(tmp_path, env, "server", "stop")
    assert stopped.stdout.strip() == f"stopped PID {pid}"


def test_server_alone_takes_serve_options_but_not_with_a_subcommand() -> None:
    result = invoke(["server", "--listen-addr", ":9", "status"])
    assert result.exit_code == 2
    assert "server start" in result.output


def test_server_health_with_a_pid_file_checks_who_answers(
    live: LiveProxy, tmp_path: Path
) -> None:
    pid_file = tmp_path / "mine.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # the live proxy runs in this process
    args = ["server", "health", "--url", live.url, "--pid-file", str(pid_file)]
    ours = invoke(args)
    assert ours.exit_code == 0, ours.output + ours.stderr
    assert f"pid:    {os.getpid()} listens on 127.0.0.1:" in ours.output

    with subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"]
    ) as other:
        try:
            pid_file.write_text(f"{other.pid}\n")
            theirs = invoke(args)
        finally:
            other.kill()
    assert theirs.exit_code == 1
    assert f"is not PID {other.pid}" in theirs.stderr

    pid_file.write_text("999999999\n")
    stale = invoke(args)
    assert stale.exit_code == 1 and "no running server" in stale.stderr
    remote = invoke(["server", "health", "--url", "http://192.0.2.1:9"] + args[4:])
    assert remote.exit_code == 2 and "local" in remote.stderr


def test_owns_listener_reads_the_sockets_of_a_process() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert owns_listener(os.getpid(), port) is True
        assert owns_listener(os.getpid(), closed_port()) is False
        assert owns_listener(999999999, port) is False


def test_wait_for_child_tells_ours_from_another_server_and_from_a_death(
    live: LiveProxy,
) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    with subprocess.Popen(sleeper) as other:
        try:
            outcome = run(wait_for_child(other, live.url, port, 0.5))
        finally:
            other.kill()
    assert outcome == ChildStart(ready=False, exited=False, other_answers=True)
    with subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]) as dying:
        outcome = run(wait_for_child(dying, live.url, port, 20))
    assert outcome.exited and not outcome.ready

    own_port = closed_port()
    serve_health = (
        "from aiohttp import web\n"
        "app = web.Application()\n"
        "async def ok(request): return web.json_response({'status': 'ok'})\n"
        "app.router.add_get('/health', ok)\n"
        f"web.run_app(app, host='127.0.0.1', port={own_port}, print=None)\n"
    )
    with subprocess.Popen([sys.executable, "-c", serve_health]) as child:
        try:
            outcome = run(
                wait_for_child(child, f"http://127.0.0.1:{own_port}", own_port, 20)
            )
        finally:
            child.kill()
    assert outcome == ChildStart(ready=True, exited=False, other_answers=False)


def test_manage_takes_url_and_token_after_the_subcommand_as_the_seed_writes(
    live: LiveProxy,
) -> None:
    flags = ["--manage-api-base-url", live.url, "--management-token", MANAGEMENT_TOKEN]
    project_id = create_project(live)["project_id"]
    listed = invoke(["manage", "project", "list", *flags])
    assert listed.exit_code == 0, listed.output + listed.stderr
    assert project_id in listed.output
    generated = json_out(
        invoke(
            ["manage", "token", "generate", "--project-id", project_id]
            + ["--management-token", MANAGEMENT_TOKEN]
            + ["--manage-api-base-url", live.url, "--json"]
        )
    )
    shown = json_out(
        invoke(
            ["manage", "token", "get", generated["token_id"]]
            + ["--management-token", MANAGEMENT_TOKEN]
            + ["--manage-api-base-url", live.url, "--json"]
        )
    )
    assert shown["token_id"] == generated["token_id"]
    middle = invoke(["manage", "project", *flags, "list", "--json"])
    assert json_out(middle)[0]["project_id"] == project_id
    closest_wins = invoke(
        ["manage", "--manage-api-base-url", "http://127.0.0.1:9"]
        + ["project", "list", *flags]
    )
    assert closest_wins.exit_code == 0, closest_wins.stderr


def test_manage_and_chat_find_the_proxy_from_listen_addr_in_dotenv(
    live: LiveProxy,
) -> None:
    port = live.url.rsplit(":", 1)[1]
    Path(".env").write_text(
        f"LISTEN_ADDR=0.0.0.0:{port}\nMANAGEMENT_TOKEN={MANAGEMENT_TOKEN}\n"
    )
    listed = invoke(["manage", "project", "list", "--json"])
    assert json_out(listed) == []
    project_id = create_project(live)["project_id"]
    token = create_token(live, project_id)["token"]
    chat = invoke(["openai", "chat", "--token", token, "--no-stream"], input="hi\n")
    assert chat.exit_code == 0, chat.output + chat.stderr
    assert chat.output == message_content(load_fixture("chat_completion.json")) + "\n"
    elsewhere = invoke(
        ["manage", "project", "list"], {"MANAGE_API_BASE_URL": "http://127.0.0.1:9"}
    )
    assert "cannot reach the management API at http://127.0.0.1:9" in elsewhere.stderr


def test_db_status_of_a_missing_sqlite_file_says_so_and_creates_nothing(
    tmp_path: Path,
) -> None:
    where = tmp_path / "nonexistent" / "x.db"
    result = invoke(["db", "status", "--database-url", f"sqlite:///{where}"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: no database at {where} (create it with `llm-proxy db migrate`)"
    )
    assert not where.parent.exists()


def test_db_and_dispatcher_do_not_need_a_management_token(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    assert invoke(["db", "migrate"], env).exit_code == 0
    status = invoke(["db", "status"], env)
    assert status.exit_code == 0, status.stderr
    assert status.output.startswith("schema version: ")
    dispatcher = invoke(["dispatcher", "--service", "file"], env)
    assert dispatcher.exit_code == 2
    assert "REDIS_URL" in dispatcher.stderr
    assert "MANAGEMENT_TOKEN" not in dispatcher.stderr


def test_project_create_without_a_terminal_or_key_says_how_to_pass_the_key(
    live: LiveProxy, tmp_path: Path
) -> None:
    result = run_command(
        tmp_path,
        process_env(**live.env()),
        "manage",
        "project",
        "create",
        "--name",
        "no-key",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "OPENAI_API_KEY" in result.stderr
    assert "GetPassWarning" not in result.stderr and "Upstream API key" not in (
        result.stdout + result.stderr
    )
    assert json_out(invoke(["manage", "project", "list", "--json"], live.env())) == []


def test_project_create_in_a_terminal_asks_for_the_hidden_key(
    live: LiveProxy, tmp_path: Path
) -> None:
    code, output = run_in_terminal(
        tmp_path,
        process_env(**live.env()),
        ["manage", "project", "create", "--name", "typed", "--json"]
        + ["--description", "x", "--metadata", '{"owner": "ops"}'],
        [("Upstream API key (hidden)", UPSTREAM_KEY)],
    )
    assert code == 0, output
    assert '"name": "typed"' in output and UPSTREAM_KEY not in output
    assert '"owner": "ops"' in output


def test_setup_in_a_terminal_asks_for_each_value_and_the_hidden_key(
    tmp_path: Path,
) -> None:
    answers = [
        ("Listen address", "127.0.0.1:9292"),
        ("Database URL", f"sqlite:///{tmp_path / 'i.db'}"),
        ("Upstream API URL", "http://127.0.0.1:9"),
        ("First project name", "interactive"),
        ("Upstream API key (hidden)", UPSTREAM_KEY),
    ]
    code, output = run_in_terminal(tmp_path, process_env(), ["setup"], answers)
    assert code == 0, output
    assert "project 'interactive' created" in output
    assert UPSTREAM_KEY not in output
    assert "LISTEN_ADDR=127.0.0.1:9292" in (tmp_path / ".env").read_text()
