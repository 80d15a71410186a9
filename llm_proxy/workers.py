"""`serve --workers N`: one supervisor process, N worker processes on one socket.

The supervisor binds LISTEN_ADDR once, prepares the database once (key file,
migrations, key check), and starts each worker as a fresh interpreter (`python -m
llm_proxy.workers`) that inherits the listening socket and runs `server.serve` on it.
Its loop (`supervisor.py`) restarts a worker that exits, forwards SIGTERM/SIGINT for
a graceful drain, and gives up with exit code 1 when a worker keeps dying at start. It
runs no app and no event loop of its own. docs/operations.md ("Several workers")
describes the rules for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

from .config import ConfigError, Settings
from .supervisor import DEFAULT_RESTART_POLICY, RestartPolicy, Supervisor

# By name: a worker runs this module as __main__.
log = logging.getLogger("llm_proxy.workers")

# A worker re-listens with aiohttp's backlog (SockSite calls listen() again).
LISTEN_BACKLOG: Final = 128
PARENT_CHECK_INTERVAL_S: Final = 0.5
# Past SHUTDOWN_GRACE_PERIOD and DISPATCHER_DRAIN_TIMEOUT, what a worker's cleanup
# (bus close, usage flush, pools) may take before the supervisor kills it.
DRAIN_MARGIN_S: Final = 5.0
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

# -- the supervisor process ------------------------------------------------------------


def bind_listener(host: str, port: int) -> socket.socket:
    """The fleet's listening socket on `host:port` (port 0: a free one)."""
    family = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0][0]
    return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)


def prepare_database(settings: Settings) -> None:
    """Key file, migrations and the key check, once, before any worker starts.

    Workers started together would race for them: two SQLite key files (one fails on
    O_EXCL), migrations applied side by side, two key-check rows.
    """
    from .app import master_key
    from .auth.crypto import KeyCipher
    from .management.service import check_encryption_key
    from .server import new_event_loop
    from .storage import create_repository

    key = master_key(settings)

    async def prepare() -> None:
        repository = create_repository(settings.database_url, pool_max_size=1)
        await repository.connect()
        try:
            applied = await repository.migrate()
            if applied:
                log.info("applied database migrations %s", applied)
            await check_encryption_key(repository, KeyCipher(key))
        finally:
            await repository.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(prepare())


def worker_argv(index: int, fd: int, ready_fd: int) -> list[str]:
    """The command line of worker `index` serving on inherited descriptor `fd`."""
    return [
        sys.executable,
        "-m",
        "llm_proxy.workers",
        "--listen-fd",
        str(fd),
        "--ready-fd",
        str(ready_fd),
        str(index),
    ]


def drain_timeout_s(settings: Settings) -> float:
    """How long the supervisor waits for its workers to stop."""
    return (
        settings.shutdown_grace_s + settings.dispatcher.drain_timeout_s + DRAIN_MARGIN_S
    )


def run_fleet(
    settings: Settings,
    environ: Mapping[str, str],
    pid_file: Path | None = None,
    *,
    policy: RestartPolicy = DEFAULT_RESTART_POLICY,
) -> int:
    """The supervisor process of `serve --workers N`; returns the exit code.

    `environ` is what every worker reads its settings from (the environment, `.env`
    and the command-line flags, merged by the caller). Raises OSError when the
    address cannot be bound.
    """
    from .server import remove_pid_file, write_pid_file

    listener = bind_listener(settings.listen_host, settings.listen_port)
    try:
        prepare_database(settings)
        fd = listener.fileno()
        env = dict(environ)

        def spawn(index: int, ready_fd: int) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                worker_argv(index, fd, ready_fd),
                env=env,
                pass_fds=(fd, ready_fd),
                close_fds=True,
            )

        supervisor = Supervisor(
            settings.workers,
            spawn,
            policy=policy,
            drain_timeout_s=drain_timeout_s(settings),
        )
        with _signals_to(supervisor):
            if pid_file is not None:
                write_pid_file(pid_file, os.getpid())
            host, port = listener.getsockname()[:2]
            log.info(
                "llm-proxy supervisor started",
                extra={"workers": settings.workers, "listen": f"{host}:{port}"},
            )
            code = supervisor.run()
    finally:
        listener.close()
        if pid_file is not None:
            remove_pid_file(pid_file, os.getpid())
    log.info("llm-proxy supervisor stopped", extra={"exit_code": code})
    return code


@contextlib.contextmanager
def _signals_to(supervisor: Supervisor) -> Iterator[None]:
    """SIGTERM/SIGINT stop the fleet; SIGCHLD wakes the loop at once."""

    def on_stop(signum: int, _: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        supervisor.stop(signum)

    previous = {sig: signal.signal(sig, on_stop) for sig in FORWARDED_SIGNALS}
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
    old_fd = signal.set_wakeup_fd(supervisor.wake_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- a worker process ------------------------------------------------------------------


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """The settings of worker `index` on the fleet's `port`: its role, its own spool,
    a stable Redis consumer name.

    The spool holds events while Redis is down and is replayed by whoever owns it, so
    each worker has its own; the consumer name outlives a restart, so the replacement
    of worker 0 takes back the batches its predecessor read but never acknowledged.
    """
    spool = settings.events.spool_path
    events = replace(
        settings.events,
        spool_path=spool.with_name(f"{spool.stem}.worker-{index}{spool.suffix}"),
        consumer_name=f"{socket.gethostname()}-{port}-worker-{index}",
    )
    return replace(settings, worker_index=index, listen_port=port, events=events)


def watch_parent(
    parent: int, interval_s: float = PARENT_CHECK_INTERVAL_S
) -> threading.Thread:
    """SIGTERM this process once `parent` is gone (the supervisor was killed), so an
    orphaned worker drains and exits instead of serving on forever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.warning("the supervisor (PID %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="watch-supervisor", daemon=True)
    thread.start()
    return thread


def parse_worker_argv(argv: Sequence[str]) -> tuple[int, int, int]:
    """`--listen-fd FD --ready-fd FD INDEX` → (listen fd, ready fd, index)."""
    numbers = [*argv[1:2], *argv[3:5]]
    if (
        len(argv) != 5
        or (argv[0], argv[2]) != ("--listen-fd", "--ready-fd")
        or not all(a.isdigit() for a in numbers)
    ):
        raise SystemExit(
            "usage: python -m llm_proxy.workers --listen-fd FD --ready-fd FD INDEX"
        )
    return int(argv[1]), int(argv[3]), int(argv[4])


def tell_ready(fd: int) -> None:
    """Tell the supervisor this worker serves: one byte on its ready pipe."""
    with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
        os.write(fd, b"1")
    os.close(fd)


def worker_main(argv: Sequence[str]) -> None:  # pragma: no cover - a child process
    """Worker `INDEX`: the app on the inherited socket until SIGTERM/SIGINT."""
    from .logs import configure_logging
    from .proxy.allowlist_file import AllowlistConfigError
    from .server import serve

    fd, ready_fd, index = parse_worker_argv(argv)
    sock = socket.socket(fileno=fd)
    port = sock.getsockname()[1]
    settings = worker_settings(Settings.from_env(os.environ), index, port)
    configure_logging(settings.log_level, settings.log_format)
    watch_parent(os.getppid())
    try:
        serve(settings, sock=sock, on_listening=lambda: tell_ready(ready_fd))
    except (ConfigError, AllowlistConfigError) as exc:  # one line, no traceback
        log.error("worker %d cannot start: %s", index, exc)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover - the worker's entry point
    worker_main(sys.argv[1:])
