"""The supervisor of `serve --workers N`: its restart rule, settings and loop.

The loop runs here in a thread over tiny stand-in workers (`python -c ...`), so every
branch of the rule is exercised in seconds; tests/test_workers_process.py runs the
real fleet.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm_proxy.cli import main
from llm_proxy.config import ConfigError, Settings
from llm_proxy.supervisor import RestartPolicy, Supervisor, exit_text
from llm_proxy.workers import (
    bind_listener,
    parse_worker_argv,
    worker_argv,
    worker_settings,
)

from .support import MANAGEMENT_TOKEN

FAST = RestartPolicy(
    early_exit_s=2.0, max_early_exits=3, backoff_base_s=0.01, backoff_max_s=0.02
)
REDIS = "redis://127.0.0.1:6379/0"


READY = "import os, sys; os.write(int(sys.argv[1]), b'1')\n"


def stand_in(code: str, ready_fd: int) -> subprocess.Popen[bytes]:
    """A worker stand-in; `sys.argv[1]` is its ready descriptor."""
    return subprocess.Popen(
        [sys.executable, "-c", code, str(ready_fd)], pass_fds=(ready_fd,)
    )


def sleeper(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
    return stand_in(READY + "import time; time.sleep(60)", ready_fd)


@pytest.fixture
def running() -> Iterator[list[Supervisor]]:
    """Supervisors started by a test; stopped whatever happens."""
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.stop()


def in_thread(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()))
    thread.start()
    return thread, result


def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the rule ---------------------------------------------------------------------------


def test_restart_policy_restarts_a_long_lived_worker_at_once_and_forgets_early_exits() -> (
    None
):
    policy = RestartPolicy(early_exit_s=5, max_early_exits=5, backoff_base_s=0.5)
    assert policy.after_exit(3, served_s=60.0) == (0, 0.0)


def test_restart_policy_backs_off_doubling_then_gives_up_at_the_limit() -> None:
    policy = RestartPolicy(
        early_exit_s=5, max_early_exits=5, backoff_base_s=0.5, backoff_max_s=3.0
    )
    delays, early = [], 0
    for _ in range(5):
        early, delay = policy.after_exit(early, served_s=None if early else 1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 3.0, None]
    assert early == 5


def test_exit_text_names_the_signal_or_the_code() -> None:
    assert exit_text(-9) == "signal SIGKILL"
    assert exit_text(3) == "code 3"
    assert exit_text(-200) == "signal 200"


# -- settings ---------------------------------------------------------------------------


def fleet_env(**extra: str) -> dict[str, str]:
    return {"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN, "REDIS_URL": REDIS, **extra}


def test_workers_setting_counts_processes_and_auto_is_the_cpu_count() -> None:
    import os

    assert Settings.from_env(fleet_env()).workers == 1
    assert Settings.from_env(fleet_env(WORKERS="3")).workers == 3
    assert Settings.from_env(fleet_env(WORKERS="auto")).workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_workers_setting_refuses_a_bad_value_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match=r"WORKERS \(--workers\) must be"):
        Settings.from_env(fleet_env(WORKERS=value))


def test_several_workers_use_the_redis_bus_unless_told_otherwise() -> None:
    assert Settings.from_env(fleet_env(WORKERS="2")).event_bus == "redis"
    assert Settings.from_env(fleet_env(WORKERS="1")).event_bus == "memory"
    with pytest.raises(ConfigError, match="LLM_PROXY_EVENT_BUS=redis"):
        Settings.from_env(fleet_env(WORKERS="2", LLM_PROXY_EVENT_BUS="memory"))


def test_several_workers_refuse_the_admin_pages() -> None:
    env = fleet_env(WORKERS="2", ADMIN_USER="admin", ADMIN_PASSWORD="a-long-password")
    with pytest.raises(ConfigError, match="ADMIN_USER"):
        Settings.from_env(env)


def test_serve_with_two_workers_and_no_redis_fails_naming_redis_url() -> None:
    result = CliRunner().invoke(
        main, ["serve", "--workers", "2"], env={"MANAGEMENT_TOKEN": MANAGEMENT_TOKEN}
    )
    assert result.exit_code == 2
    assert "WORKERS=2 (--workers) needs REDIS_URL" in result.stderr


def test_worker_settings_give_each_worker_its_spool_and_a_stable_consumer() -> None:
    base = Settings.from_env(fleet_env(WORKERS="2", EVENT_SPOOL_PATH="d/spool.jsonl"))
    first, second = (worker_settings(base, i, 8123) for i in (0, 1))
    assert (first.worker_index, second.worker_index) == (0, 1)
    assert first.events.spool_path == Path("d/spool.worker-0.jsonl")
    assert second.events.spool_path == Path("d/spool.worker-1.jsonl")
    assert first.events.consumer_name and first.events.consumer_name.endswith(
        "-8123-worker-0"
    )
    assert worker_settings(base, 1, 8123).events == second.events
    assert second.listen_port == 8123


def test_worker_argv_round_trips_and_a_bad_one_is_refused() -> None:
    argv = worker_argv(2, 7, 9)
    assert argv[:3] == [sys.executable, "-m", "llm_proxy.workers"]
    assert parse_worker_argv(argv[3:]) == (7, 9, 2)
    with pytest.raises(SystemExit, match="usage"):
        parse_worker_argv(["--listen-fd", "x", "--ready-fd", "3", "1"])


def test_bind_listener_binds_once_and_tells_the_port() -> None:
    with bind_listener("127.0.0.1", 0) as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        with pytest.raises(OSError):
            bind_listener("127.0.0.1", port).close()


# -- the loop ---------------------------------------------------------------------------


def test_supervisor_replaces_a_killed_worker_and_drains_on_stop(
    running: list[Supervisor],
) -> None:
    supervisor = Supervisor(2, sleeper, policy=FAST, drain_timeout_s=5)
    running.append(supervisor)
    thread, result = in_thread(supervisor)
    wait_for(lambda: supervisor.serving() == [True, True])
    first = supervisor.pids()
    victim = first[1]
    assert victim is not None
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    wait_for(lambda: supervisor.pids()[1] not in (None, victim))
    assert supervisor.pids()[0] == first[0] and supervisor.restarts == 1
    supervisor.stop()
    thread.join(10)
    assert result == [0]


def test_supervisor_gives_up_when_a_worker_keeps_dying_at_start(
    running: list[Supervisor],
) -> None:
    def spawn(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
        if index == 1:
            return stand_in("raise SystemExit(3)", ready_fd)
        return sleeper(index, ready_fd)

    supervisor = Supervisor(2, spawn, policy=FAST, drain_timeout_s=5)
    running.append(supervisor)
    thread, result = in_thread(supervisor)
    thread.join(20)
    assert result == [1]
    assert supervisor.failure == (
        "worker 1 exited (code 3) before serving or within 2 s of it, 3 times in a "
        "row: giving up (its log lines above say why)"
    )
    assert supervisor.restarts == 2
    assert supervisor.pids() == [None, None]  # the healthy worker was stopped too


def test_supervisor_kills_a_worker_that_does_not_stop_in_time(
    running: list[Supervisor],
) -> None:
    def stubborn(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
        return stand_in(
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n" + READY + "time.sleep(60)",
            ready_fd,
        )

    supervisor = Supervisor(1, stubborn, policy=FAST, drain_timeout_s=0.5)
    running.append(supervisor)
    thread, result = in_thread(supervisor)
    wait_for(lambda: supervisor.serving() == [True])  # its SIGTERM is ignored now
    started = time.monotonic()
    supervisor.stop(signal.SIGINT)
    thread.join(10)
    assert result == [1]
    assert time.monotonic() - started < 5


def test_supervisor_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Supervisor(0, sleeper)
