"""Running the app and its process: uvloop, graceful shutdown, PID files, daemonising.

The app itself is built by `app.py`; this module owns how a process runs it: the start
log line (no secrets), the PID file, re-spawning detached for `serve -d`, stopping by
SIGTERM, waiting for `/health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from . import __version__
from .app import create_app
from .clock import Clock
from .config import ListenerSettings, Settings
from .domain_errors import ProxyError
from .listener import ListenerRunner, raise_open_files_limit, resolve_listener

log = logging.getLogger(__name__)

DEFAULT_PID_FILE: Final = Path("llm-proxy.pid")
DEFAULT_LOG_FILE: Final = Path("llm-proxy.log")
POLL_INTERVAL_S: Final = 0.05
WILDCARD_HOSTS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
# CPython's default (700) runs a young-generation collection every few requests under
# load, and every in-flight request's objects survive it into older generations.
GC_GEN0_THRESHOLD: Final = 10_000
SWITCH_INTERVAL_S: Final = 0.001
SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class PidFileError(ProxyError):
    """The PID file names a live process, or cannot be read or written."""


def start_summary(
    settings: Settings, listener: ListenerSettings | None = None
) -> dict[str, Any]:
    """What the start log line says: enough to debug a deployment, no secret."""
    listener = listener or settings.listener
    worker = {} if settings.worker_index is None else {"worker": settings.worker_index}
    return {
        **worker,
        "version": __version__,
        "listen": f"{settings.listen_host}:{settings.listen_port}",
        "database": "postgresql" if settings.is_postgres else "sqlite",
        "upstream": str(settings.upstream.base_url),
        "event_bus": settings.event_bus,
        "admin": "on"
        if settings.admin_enabled
        else "off (ADMIN_USER/ADMIN_PASSWORD unset)",
        "allowlist": str(settings.api_config_path or "built-in OpenAI defaults"),
        "event_log": str(settings.file_event_log or "off"),
        "max_client_connections": listener.max_connections or "auto",
        "header_timeout_s": listener.header_timeout_s,
    }


def tune_switch_interval() -> None:
    """Let the event loop's thread take the GIL back after 1 ms, not CPython's 5 ms.

    Worker threads (aiosqlite's, the usage writes' and token reloads' database I/O)
    hold the GIL while they build rows; with the default interval the loop waits up to
    5 ms for it on each switch, a stall every request in flight pays.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def tune_gc() -> None:
    """Freeze what start-up created and collect the young generation less often.

    The modules, settings and pools made at start live as long as the process; frozen,
    no collection walks them again. Under load this cut the proxy's CPU per request by
    about a tenth (see the README's benchmark section). Cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (Linux, macOS), the stdlib loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    settings: Settings,
    pid_file: Path | None = None,
    sock: socket.socket | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; in-flight requests get `shutdown_grace_s` to finish.

    With `pid_file`, this process's PID is written there once it listens and the file
    is removed on exit (only if it still names this process). With `sock`, serve on
    that listening socket (a worker of `workers.py`) instead of binding LISTEN_ADDR;
    `on_listening` is called once it serves. Client connections are bounded by `listener.py` (header deadline, header size,
    connection cap).
    """
    listener = resolve_listener(settings, raise_open_files_limit())
    app = create_app(settings)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(
            _serve_until_signalled(
                app, settings, listener, pid_file, sock, on_listening
            )
        )
    finally:
        try:
            _cancel_leftover_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            if pid_file is not None:
                remove_pid_file(pid_file, os.getpid())
    log.info("llm-proxy stopped")


async def _serve_until_signalled(
    app: web.Application,
    settings: Settings,
    listener: ListenerSettings,
    pid_file: Path | None,
    sock: socket.socket | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Listen until the first SIGTERM/SIGINT, then shut down within the grace period."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    runner = ListenerRunner(
        app,
        listener,
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        # A client that hangs up cancels its handler at once, so a stalled
        # upstream stream is closed then, not when its next chunk arrives.
        handler_cancellation=True,
    )
    for signum in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(signum, stop.set)  # later signals: already stopping
    try:
        await runner.setup()
        site: web.BaseSite = (
            web.SockSite(runner, sock)
            if sock is not None
            else web.TCPSite(runner, settings.listen_host, settings.listen_port)
        )
        await site.start()
        tune_gc()
        tune_switch_interval()
        if pid_file is not None:
            write_pid_file(pid_file, os.getpid())
        if on_listening is not None:
            on_listening()
        log.info("llm-proxy started", extra=start_summary(settings, listener))
        await stop.wait()
        log.info("llm-proxy stopping", extra={"grace_s": settings.shutdown_grace_s})
    finally:
        try:
            await runner.cleanup()
        finally:
            for signum in SHUTDOWN_SIGNALS:
                loop.remove_signal_handler(signum)


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what the app left running (as `asyncio.run` does) and let it unwind."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def base_url_for(host: str, port: int) -> str:
    """The URL a local client uses to reach a server listening on `host:port`."""
    host = WILDCARD_HOSTS.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


# -- PID files and processes ---------------------------------------------------------


def read_pid_file(path: Path) -> int | None:
    """The PID written in `path`, or None when the file is missing or not a PID."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def process_alive(pid: int) -> bool:
    """Whether `pid` names a running process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - only when not running as root
        return True  # alive, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:  # pragma: no cover - no procfs (macOS): trust kill(0)
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def running_pid(path: Path) -> int | None:
    """The PID in `path` when that process is alive, else None."""
    pid = read_pid_file(path)
    return pid if pid is not None and process_alive(pid) else None


def write_pid_file(path: Path, pid: int) -> None:
    """Write `pid`, refusing when the file already names another live process."""
    current = running_pid(path)
    if current is not None and current != pid:
        raise PidFileError(f"{path} names running process {current}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n", encoding="ascii")


def remove_pid_file(path: Path, pid: int | None = None) -> None:
    """Remove `path`; with `pid`, only when the file still names that process."""
    if pid is not None and read_pid_file(path) != pid:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def stop_process(
    pid: int,
    timeout_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Clock = time.monotonic,
) -> bool:
    """Send SIGTERM and wait up to `timeout_s` for the exit; True once it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = clock() + timeout_s
    while process_alive(pid):
        if clock() >= deadline:
            return False
        sleep(POLL_INTERVAL_S)
    return True


def spawn_detached(
    argv: Sequence[str], log_file: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:  # pragma: no cover - exercised by real-process tests
    """Start `argv` in a new session, stdin closed, stdout and stderr to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host` (for child servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def fetch_health(
    base_url: str, path: str = "/health", timeout_s: float = 2.0
) -> tuple[int, Any]:
    """GET `base_url + path`: (status, decoded JSON or text)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(base_url.rstrip("/") + path) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def wait_until_healthy(
    base_url: str, timeout_s: float, still_starting: Callable[[], bool]
) -> bool:
    """Poll `/health` until it answers 200 (True), or the time is up or the process
    gave up (`still_starting()` returns False) (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and still_starting():
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            status, _ = await fetch_health(base_url, timeout_s=1.0)
            if status == 200:
                return True
        await asyncio.sleep(POLL_INTERVAL_S)
    return False


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file (for a start that failed)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {os.strerror(exc.errno or errno.EIO)})"
    return "\n".join(text.rstrip().splitlines()[-lines:])
