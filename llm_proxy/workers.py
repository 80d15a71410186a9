"""`serve --workers N`: one supervisor process, N worker processes on one socket.

The supervisor binds LISTEN_ADDR once, prepares the database once (key file,
migrations, key check), and starts each worker as a fresh interpreter (`python -m
llm_proxy.workers`) that inherits the listening socket and runs `server.serve` on it.
It restarts a worker that exits (`RestartPolicy`), forwards SIGTERM/SIGINT for a
graceful drain, and gives up with exit code 1 when a worker keeps dying at start. It
runs no app and no event loop of its own. docs/operations.md ("Several workers")
describes the rules for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from .config import ConfigError, Settings

# By name: a worker runs this module as __main__.
log = logging.getLogger("llm_proxy.workers")

# A worker re-listens with aiohttp's backlog (SockSite calls listen() again).
LISTEN_BACKLOG: Final = 128
POLL_INTERVAL_S: Final = 0.2
PARENT_CHECK_INTERVAL_S: Final = 0.5
# Past SHUTDOWN_GRACE_PERIOD and DISPATCHER_DRAIN_TIMEOUT, what a worker's cleanup
# (bus close, usage flush, pools) may take before the supervisor kills it.
DRAIN_MARGIN_S: Final = 5.0
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)

# spawn(index, ready_fd): the started worker, which writes one byte to `ready_fd` once
# it serves (the supervisor closes its own copy of the descriptor after the call).
Spawn = Callable[[int, int], "subprocess.Popen[bytes]"]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that exited starts again, and when the supervisor gives up.

    An exit before the worker served, or within `early_exit_s` of its first serving,
    is an early exit (a start's length is not counted: imports alone take seconds on
    a loaded machine). A worker that served longer is restarted at once and its
    count of early exits starts over;
    after an early exit it waits `backoff_base_s`, doubling per early exit in a row
    up to `backoff_max_s`. The `max_early_exits`-th early exit in a row of one
    worker stops the fleet: that is a crash loop, not bad luck.
    """

    early_exit_s: float = 5.0
    max_early_exits: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 10.0

    def after_exit(
        self, early_exits: int, served_s: float | None
    ) -> tuple[int, float | None]:
        """(early exits in a row now, seconds until the restart or None: give up).

        `served_s`: how long the worker served; None when it never did.
        """
        if served_s is not None and served_s >= self.early_exit_s:
            return 0, 0.0
        early_exits += 1
        if early_exits >= self.max_early_exits:
            return early_exits, None
        delay = self.backoff_base_s * 2 ** (early_exits - 1)
        return early_exits, min(delay, self.backoff_max_s)


@dataclass(slots=True)
class _Slot:
    """One worker position: the process holding it and its restart history."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_fd: int | None = None  # read end of the worker's ready pipe, until read
    serving_since: float | None = None
    early_exits: int = 0
    restart_at: float | None = None


def exit_text(returncode: int) -> str:
    """`code 1` or `signal SIGKILL`, as `Popen.returncode` tells it."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-returncode).name}"
        return f"signal {-returncode}"
    return f"code {returncode}"


class Supervisor:
    """Keeps `count` workers running until `stop()`; see the module docstring.

    `run()` is a plain loop (no signals of its own, so tests can run it in a thread);
    `run_fleet` wires SIGTERM/SIGINT to `stop()` and SIGCHLD to `wake_fd`.
    """

    def __init__(
        self,
        count: int,
        spawn: Spawn,
        *,
        policy: RestartPolicy = RestartPolicy(),
        drain_timeout_s: float = 30.0,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError("a fleet needs at least one worker")
        self._slots = [_Slot(index) for index in range(count)]
        self._spawn = spawn
        self._policy = policy
        self._drain_timeout_s = drain_timeout_s
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._stop_signal: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.restarts = 0
        self.failure: str | None = None

    @property
    def wake_fd(self) -> int:
        """Writing a byte here wakes `run()` (for `signal.set_wakeup_fd`)."""
        return self._wake_w

    def pids(self) -> list[int | None]:
        """The PID of each worker position (None while it waits for a restart)."""
        return [s.process.pid if s.process else None for s in self._slots]

    def serving(self) -> list[bool]:
        """Whether each worker position has a worker that reported serving."""
        return [
            s.process is not None and s.serving_since is not None for s in self._slots
        ]

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a graceful stop; `signum` is what the workers are sent."""
        if self._stop_signal is None:
            self._stop_signal = signum
        self._wake()

    def run(self) -> int:
        """Start the workers, keep them running, drain them; the exit code."""
        try:
            for slot in self._slots:
                self._start(slot)
            while self._stop_signal is None:
                self._sleep()
                self.failure = self._check()
                if self.failure is not None:
                    log.error("%s; stopping the other workers", self.failure)
                    self._stop_signal = signal.SIGTERM
                    self._drain()
                    return EXIT_FAILED
            return self._drain()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _sleep(self) -> None:
        """Until a wake-up, the next due restart or the poll interval."""
        timeout = self._poll_interval_s
        due = [s.restart_at for s in self._slots if s.restart_at is not None]
        if due:
            timeout = max(0.0, min(timeout, min(due) - self._clock()))
        pipes = {s.ready_fd: s for s in self._slots if s.ready_fd is not None}
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self._wake_r, *pipes], [], [], timeout)
            for fd in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 512)
                else:
                    self._ready(pipes[fd], os.read(fd, 1))

    def _ready(self, slot: _Slot, data: bytes) -> None:
        """The worker's ready pipe spoke: a byte (it serves) or EOF (it died)."""
        self._close_ready(slot)
        if data and slot.process is not None:
            slot.serving_since = self._clock()
            log.info("worker %d (PID %d) serves", slot.index, slot.process.pid)

    @staticmethod
    def _close_ready(slot: _Slot) -> None:
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = slot.serving_since = None
        read_fd, write_fd = os.pipe()
        try:
            slot.process = self._spawn(slot.index, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        slot.ready_fd = read_fd
        slot.started_at = self._clock()
        log.info("worker %d started (PID %d)", slot.index, slot.process.pid)

    def _check(self) -> str | None:
        """Reap exited workers, start those due; the reason to give up, if any."""
        now = self._clock()
        for slot in self._slots:
            if slot.process is not None and slot.process.poll() is not None:
                reason = self._exited(slot, now)
                if reason is not None:
                    return reason
            if slot.restart_at is not None and now >= slot.restart_at:
                self.restarts += 1
                self._start(slot)
        return None

    def _exited(self, slot: _Slot, now: float) -> str | None:
        process, lived_s = slot.process, now - slot.started_at
        assert process is not None and process.returncode is not None
        if slot.ready_fd is not None:  # a ready byte may still wait in the pipe
            with contextlib.suppress(BlockingIOError):
                self._ready(slot, os.read(slot.ready_fd, 1))
        self._close_ready(slot)
        served_s = None if slot.serving_since is None else now - slot.serving_since
        slot.process = None
        how = exit_text(process.returncode)
        slot.early_exits, delay = self._policy.after_exit(slot.early_exits, served_s)
        if delay is None:
            return (
                f"worker {slot.index} exited ({how}) before serving or within "
                f"{self._policy.early_exit_s:g} s of it, {slot.early_exits} times in "
                "a row: giving up (its log lines above say why)"
            )
        log.warning(
            "worker %d (PID %d) exited (%s) after %.1f s; restarting in %.1f s",
            slot.index,
            process.pid,
            how,
            lived_s,
            delay,
        )
        slot.restart_at = now + delay
        return None

    def _drain(self) -> int:
        """Forward the stop signal, wait for every worker; kill what is left."""
        signum = self._stop_signal or signal.SIGTERM
        running = [s.process for s in self._slots if s.process is not None]
        for slot in self._slots:
            self._close_ready(slot)
            slot.process = slot.restart_at = None
        log.info("stopping %d workers (%s)", len(running), signal.Signals(signum).name)
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        deadline = self._clock() + self._drain_timeout_s
        while any(p.poll() is None for p in running) and self._clock() < deadline:
            self._sleep()
        left = [p for p in running if p.poll() is None]
        for process in left:
            log.error(
                "worker PID %d did not stop within %.0f s; killing it",
                process.pid,
                self._drain_timeout_s,
            )
            process.kill()
            process.wait()
        return EXIT_FAILED if left else EXIT_OK


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
    policy: RestartPolicy = RestartPolicy(),
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
