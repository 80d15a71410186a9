"""The supervisor loop of `serve --workers N`: the restart rule, ready pipes, the drain.

`Supervisor` starts workers through a `Spawn` callable, learns from each worker's
ready pipe when it serves, restarts one that exits (`RestartPolicy`), and on `stop()`
forwards the signal and waits for every worker. It knows nothing of sockets,
settings or signal handlers: `workers.run_fleet` wires those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .backoff import NO_JITTER, RetryPolicy
from .clock import Clock

# The fleet's log lines, from this module and workers.py, under one logger name.
log = logging.getLogger("llm_proxy.workers")

POLL_INTERVAL_S: Final = 0.2
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1

# spawn(index, ready_fd): the started worker, which writes one byte to `ready_fd` once
# it serves (the supervisor closes its own copy of the descriptor after the call).
Spawn = Callable[[int, int], "subprocess.Popen[bytes]"]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that exited starts again, and when the supervisor gives up.

    An exit before the worker served, or within `early_exit_s` of its first serving,
    is an early exit (a start's length is not counted: imports alone take seconds on
    a loaded machine). A worker that served longer is restarted at once and its
    count of early exits starts over; after an early exit it waits `backoff_base_s`,
    doubling per early exit in a row up to `backoff_max_s`, without jitter (the wait
    the log line names is the wait). The `max_early_exits`-th early exit in a row of
    one worker stops the fleet: that is a crash loop, not bad luck.
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
        backoff = RetryPolicy(
            base_s=self.backoff_base_s, max_s=self.backoff_max_s, jitter=NO_JITTER
        )
        return early_exits, backoff.delay_s(early_exits - 1)


DEFAULT_RESTART_POLICY: Final = RestartPolicy()


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
        policy: RestartPolicy = DEFAULT_RESTART_POLICY,
        drain_timeout_s: float = 30.0,
        poll_interval_s: float = POLL_INTERVAL_S,
        clock: Clock = time.monotonic,
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
