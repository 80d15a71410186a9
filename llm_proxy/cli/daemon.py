"""`serve -d`: start `serve` detached, wait until it answers, and check the answer is ours."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import click

from ..config import Settings
from ..server import base_url_for, fetch_health, running_pid, spawn_detached, tail
from .base import DAEMON_START_TIMEOUT_S, SERVE_FLAGS, fail, run

POLL_INTERVAL_S: Final = 0.1
LISTEN_STATE: Final = "0A"  # TCP_LISTEN in /proc/net/tcp
LOG_TAIL_LINES: Final = 8


@dataclass(frozen=True, slots=True)
class ChildStart:
    """How a detached child's start ended: it answers, it died, or time ran out.

    `other_answers`: some other process answered `/health` on the child's port.
    """

    ready: bool
    exited: bool
    other_answers: bool


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
    """Re-spawn `serve` detached; succeed only once that very process answers."""
    if (pid := running_pid(pid_file)) is not None:
        fail(f"already running with PID {pid} ({pid_file})")
    argv = daemon_argv(flags, pid_file, debug)
    process = spawn_detached(argv, log_file.absolute())
    url = base_url_for(settings.listen_host, settings.listen_port)
    outcome = run(
        wait_for_child(process, url, settings.listen_port, DAEMON_START_TIMEOUT_S)
    )
    if outcome.exited:
        fail(
            f"the server exited at start (code {process.returncode}); "
            f"the end of {log_file}:\n{tail(log_file, LOG_TAIL_LINES)}"
        )
    if not outcome.ready:
        other = " (another process answers there)" if outcome.other_answers else ""
        fail(
            f"PID {process.pid} still runs but has not answered {url}/health within "
            f"{DAEMON_START_TIMEOUT_S:g} s{other}; see {log_file}, stop it with "
            f"`llm-proxy server stop --pid-file {pid_file}`"
        )
    click.echo(f"llm-proxy running in the background: PID {process.pid}, {url}")
    click.echo(f"log: {log_file}   stop: llm-proxy server stop --pid-file {pid_file}")


async def wait_for_child(
    process: subprocess.Popen[bytes], url: str, port: int, timeout_s: float
) -> ChildStart:
    """Poll until `process` itself answers `/health` on `port`, dies, or time runs out.

    Another server already on the port answers too, so an answer counts only when
    `process` holds the listening socket (where the platform can tell).
    """
    deadline = time.monotonic() + timeout_s
    other_answers = False
    while time.monotonic() < deadline and process.poll() is None:
        if await _answers(url):
            if owns_listener(process.pid, port) is not False:
                return ChildStart(ready=True, exited=False, other_answers=False)
            other_answers = True
        await asyncio.sleep(POLL_INTERVAL_S)
    exited = process.poll() is not None
    return ChildStart(ready=False, exited=exited, other_answers=other_answers)


async def _answers(url: str) -> bool:
    try:
        status, _ = await fetch_health(url, timeout_s=1.0)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == 200


def owns_listener(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a TCP socket listening on `port`.

    Read from procfs (Linux): the listening sockets of the process's network
    namespace, matched by inode against its open descriptors. None where that
    cannot be read (no procfs, another user's process).
    """
    if not Path("/proc/self/net/tcp").exists():  # pragma: no cover - not Linux
        return None
    try:
        inodes = _listening_inodes(pid, port)
        if not inodes:
            return False
        targets = {f"socket:[{inode}]" for inode in inodes}
        fd_dir = f"/proc/{pid}/fd"
        for name in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{name}") in targets:
                    return True
            except FileNotFoundError:  # pragma: no cover - closed while we looked
                continue
    except FileNotFoundError:
        return False  # the process is gone
    except PermissionError:  # pragma: no cover - only when not running as root
        return None
    return False


def _listening_inodes(pid: int, port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            if table == "tcp":
                raise
            continue  # pragma: no cover - a kernel without IPv6
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            if local_port == port and fields[3] == LISTEN_STATE:
                inodes.add(fields[9])
    return inodes
