"""Real processes: `serve -d`, `server health|status|stop`, and a newcomer's first run.

Each command runs as its own process in a temporary working directory, the way a
person types them; nothing is imported into the test's interpreter but the helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_proxy.cli.chat import delta_content
from llm_proxy.devtools.bench_mock import PROXY_ENV_NAMES
from llm_proxy.devtools.fake_upstream import load_fixture, split_sse_events
from llm_proxy.server import free_port, process_alive, read_pid_file

from .hostile.rawhttp import exchange, open_raw, read_response, request_bytes
from .support import MANAGEMENT_TOKEN, UPSTREAM_KEY

SCRIPT = Path(sys.executable).with_name("llm-proxy")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "llm_proxy"]
EXTRA_ENV_NAMES = ("OPENAI_API_KEY", "MANAGE_API_BASE_URL", "LLM_PROXY_TOKEN")


def clean_environ(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy setting, plus `extra`."""
    drop = PROXY_ENV_NAMES | set(EXTRA_ENV_NAMES)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def cli(
    cwd: Path, env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def daemon_cleanup(tmp_path: Path) -> Iterator[None]:
    """Whatever happens, do not leave a daemon behind."""
    yield
    pid = read_pid_file(tmp_path / "llm-proxy.pid")
    if pid is not None and process_alive(pid):
        os.kill(pid, 9)


def test_serve_daemon_health_status_stop_as_real_processes(
    tmp_path: Path, daemon_cleanup: None
) -> None:
    port = free_port()
    env = clean_environ(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        OPENAI_API_URL=f"http://127.0.0.1:{free_port()}",
        DATABASE_URL=f"sqlite:///{tmp_path / 'data' / 'proxy.db'}",
        LOG_FORMAT="text",
    )
    url = f"http://127.0.0.1:{port}"

    started = cli(tmp_path, env, "serve", "-d", "--listen-addr", f"127.0.0.1:{port}")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "running in the background" in started.stdout
    pid = read_pid_file(tmp_path / "llm-proxy.pid")
    assert pid is not None and process_alive(pid)

    again = cli(tmp_path, env, "serve", "-d", "--listen-addr", f"127.0.0.1:{port}")
    assert again.returncode == 1 and f"already running with PID {pid}" in again.stderr

    health = cli(tmp_path, env, "server", "health", "--url", url)
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.startswith("health: 200")
    status = cli(tmp_path, env, "server", "status")
    assert (status.returncode, status.stdout.strip()) == (0, f"running (PID {pid})")

    stopped = cli(tmp_path, env, "server", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert stopped.stdout.strip() == f"stopped PID {pid}"
    assert wait_gone(pid)
    assert not (tmp_path / "llm-proxy.pid").exists()
    log = (tmp_path / "llm-proxy.log").read_text()
    assert "llm-proxy started" in log and "llm-proxy stopped" in log

    assert cli(tmp_path, env, "server", "status").returncode == 3
    down = cli(tmp_path, env, "server", "health", "--url", url)
    assert down.returncode == 1 and "is down" in down.stderr


def test_serve_daemon_that_cannot_start_reports_its_log(
    tmp_path: Path, daemon_cleanup: None
) -> None:
    env = clean_environ(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        DATABASE_URL=f"sqlite:///{tmp_path / 'p.db'}",
        API_CONFIG_PATH=str(tmp_path / "missing.yaml"),
    )
    result = cli(
        tmp_path, env, "serve", "-d", "--listen-addr", f"127.0.0.1:{free_port()}"
    )
    assert result.returncode == 1
    assert "the server exited at start" in result.stderr
    assert not (tmp_path / "llm-proxy.pid").exists()


def test_newcomer_setup_serve_generate_token_and_chat(
    tmp_path: Path, daemon_cleanup: None
) -> None:
    upstream_port, port = free_port(), free_port()
    fake = subprocess.Popen(
        [*COMMAND, "fake-upstream", "--port", str(upstream_port)],
        env=clean_environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        env = clean_environ()
        setup = cli(
            tmp_path,
            clean_environ(OPENAI_API_KEY=UPSTREAM_KEY),
            "setup",
            "--non-interactive",
            "--listen-addr",
            f"127.0.0.1:{port}",
            "--openai-api-url",
            f"http://127.0.0.1:{upstream_port}",
            "--project",
            "demo",
        )
        assert setup.returncode == 0, setup.stdout + setup.stderr
        match = re.search(r"project 'demo' created: (\S+)", setup.stdout)
        assert match is not None
        project_id = match.group(1)

        served = cli(tmp_path, env, "serve", "-d")
        assert served.returncode == 0, served.stdout + served.stderr

        base = f"http://127.0.0.1:{port}"
        generated = cli(
            tmp_path,
            env,
            "manage",
            "--manage-api-base-url",
            base,
            "token",
            "generate",
            "--project-id",
            project_id,
            "--duration-minutes",
            "10",
        )
        assert generated.returncode == 0, generated.stdout + generated.stderr
        token_line = next(
            ln for ln in generated.stdout.splitlines() if ln.startswith("token ")
        )
        token = token_line.split()[-1]

        chat = cli(
            tmp_path,
            env,
            "openai",
            "chat",
            "--base-url",
            base,
            "--token",
            token,
            stdin="Say hello.\n",
        )
        assert chat.returncode == 0, chat.stdout + chat.stderr
        events = split_sse_events(load_fixture("chat_stream_no_usage.sse"))
        expected = "".join(delta_content(e.strip()) or "" for e in events)
        assert chat.stdout == expected + "\n"

        stopped = cli(tmp_path, env, "server", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    finally:
        fake.terminate()
        fake.wait(10)


async def test_served_proxy_closes_a_stalled_upstream_stream_when_the_client_leaves(
    tmp_path: Path, fake: Any, proxy_env: dict[str, str]
) -> None:
    """`llm-proxy serve` as a real process: a client hanging up mid-stream cancels at once."""
    port = free_port()
    env = clean_environ(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        LISTEN_ADDR=f"127.0.0.1:{port}",
        OPENAI_API_URL=proxy_env["OPENAI_API_URL"],
        FILE_EVENT_LOG="off",
    )
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_healthy(session, base)
            token = await _mint_token(session, base)
            body = {
                "model": "gpt-4o-mini",
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
            headers = {
                "Authorization": f"Bearer {token}",
                "x-fake-behaviour": "stall-after-first-event",
            }
            response = await session.post(
                f"{base}/v1/chat/completions", json=body, headers=headers
            )
            await response.content.readuntil(b"\n\n")
            response.close()  # the client hangs up while the upstream is stalled
            await fake.wait_for(lambda state: state.streams_cancelled == 1, 5)
    finally:
        process.terminate()
        await process.wait()
    assert fake.open_streams == 0


async def _wait_healthy(session: aiohttp.ClientSession, base: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                async with session.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def _mint_token(session: aiohttp.ClientSession, base: str) -> str:
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    project = {"name": "served", "openai_api_key": UPSTREAM_KEY}
    async with session.post(f"{base}/manage/projects", json=project, headers=auth) as r:
        project_id = (await r.json())["project_id"]
    token = {"project_id": project_id, "duration_minutes": 5}
    async with session.post(f"{base}/manage/tokens", json=token, headers=auth) as r:
        return str((await r.json())["token"])


async def _start_served(
    tmp_path: Path, fake_url: str, open_files: int | None = None, **extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    """`llm-proxy serve` in the foreground, healthy; optionally under `ulimit -n`."""
    port = free_port()
    settings = {"FILE_EVENT_LOG": "off", "LOG_FORMAT": "text", **extra}
    env = clean_environ(
        MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
        LISTEN_ADDR=f"127.0.0.1:{port}",
        OPENAI_API_URL=fake_url,
        **settings,
    )

    def limit_open_files() -> None:  # pragma: no cover - runs in the child
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    with (tmp_path / "serve.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *COMMAND,
            "serve",
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=log,
            preexec_fn=limit_open_files,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_healthy(session, base)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process, base


async def _stop_served(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:  # pragma: no cover - only when shutdown hangs
            process.kill()
            await process.wait()


def _port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_served_proxy_answers_a_stalled_request_header_with_408(
    tmp_path: Path, proxy_env: dict[str, str]
) -> None:
    process, base = await _start_served(
        tmp_path, proxy_env["OPENAI_API_URL"], CLIENT_HEADER_TIMEOUT="1"
    )
    try:
        reader, writer = await open_raw("127.0.0.1", _port_of(base))
        started = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end
        answer = await read_response(reader, timeout_s=10.0)
        assert answer.status == 408
        assert time.monotonic() - started >= 0.9
        assert await reader.read() == b""
        writer.close()
    finally:
        await _stop_served(process)


async def test_sigterm_with_an_open_stream_exits_within_one_grace_period(
    tmp_path: Path, fake: Any, proxy_env: dict[str, str]
) -> None:
    grace_s = 2.5
    events = tmp_path / "events.jsonl"
    process, base = await _start_served(
        tmp_path,
        proxy_env["OPENAI_API_URL"],
        SHUTDOWN_GRACE_PERIOD=str(grace_s),
        FILE_EVENT_LOG=str(events),
        USAGE_ESTIMATION="off",  # no tiktoken load while shutting down
    )
    try:
        async with aiohttp.ClientSession() as session:
            token = await _mint_token(session, base)
            response = await session.post(
                f"{base}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "stream": True, "messages": []},
                headers={
                    "Authorization": f"Bearer {token}",
                    "x-fake-behaviour": "stall-after-first-event",
                },
            )
            await response.content.readuntil(b"\n\n")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(grace_s * 4):
                await process.wait()
            took = time.monotonic() - started
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    finally:
        await _stop_served(process)
    assert process.returncode == 0
    assert grace_s * 0.9 <= took < grace_s * 1.7  # one grace period, not two
    cut = [
        json.loads(line)
        for line in events.read_text().splitlines()
        if '"/v1/chat/completions"' in line
    ]
    assert [event["error"] for event in cut] == ["shutdown"]
    assert "llm-proxy stopped" in (tmp_path / "serve.log").read_text()


async def _flood(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open up to `count` idle connections, 50 at a time (the listen backlog is 128)."""

    async def one() -> asyncio.StreamWriter | None:
        try:
            _, writer = await open_raw("127.0.0.1", port, timeout_s=5.0)
        except (OSError, TimeoutError):
            return None
        return writer

    opened: list[asyncio.StreamWriter | None] = []
    for _ in range(0, count, 50):
        opened += await asyncio.gather(*(one() for _ in range(50)))
    return [writer for writer in opened if writer is not None]


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_served_proxy_at_the_descriptor_limit_keeps_serving_and_recovers(
    tmp_path: Path, proxy_env: dict[str, str]
) -> None:
    # An explicit cap far above what `ulimit -n 256` allows: accept() hits EMFILE.
    process, base = await _start_served(
        tmp_path,
        proxy_env["OPENAI_API_URL"],
        open_files=256,
        MAX_CLIENT_CONNECTIONS="5000",
        UPSTREAM_MAX_CONNECTIONS="10",
    )
    port = _port_of(base)
    reader, writer = await open_raw("127.0.0.1", port)  # a healthy client
    flood: list[asyncio.StreamWriter] = []
    try:
        flood = await _flood(port, 400)
        assert _open_files(process.pid) >= 250  # at the limit: accept() fails
        cpu_before = _cpu_seconds(process.pid)
        await asyncio.sleep(1.0)
        assert _cpu_seconds(process.pid) - cpu_before < 0.5  # no accept() spin
        writer.write(request_bytes("GET", "/health"))
        assert (await read_response(reader)).status == 200
        for other in flood:
            other.close()
        flood = []
        async with asyncio.timeout(10):  # descriptors free: accepted again
            while True:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    fresh = await exchange(
                        "127.0.0.1", port, request_bytes("GET", "/health"), 2.0
                    )
                    if fresh.status == 200:
                        break
                await asyncio.sleep(0.1)
        assert process.returncode is None
    finally:
        writer.close()
        for other in flood:
            other.close()
        await _stop_served(process)
    assert "MAX_CLIENT_CONNECTIONS=5000 exceeds" in (tmp_path / "serve.log").read_text()


async def test_served_proxy_auto_cap_answers_503_before_the_descriptor_limit(
    tmp_path: Path, proxy_env: dict[str, str]
) -> None:
    process, base = await _start_served(
        tmp_path,
        proxy_env["OPENAI_API_URL"],
        open_files=300,  # auto cap: 300 - 10 upstream - 10 database - 128 = 152
        UPSTREAM_MAX_CONNECTIONS="10",
        CLIENT_HEADER_TIMEOUT="30",
    )
    port = _port_of(base)
    reader, writer = await open_raw("127.0.0.1", port)
    flood: list[asyncio.StreamWriter] = []
    try:
        readers_writers = [
            await open_raw("127.0.0.1", port, timeout_s=5.0) for _ in range(250)
        ]
        flood = [w for _, w in readers_writers]
        outcomes = await asyncio.gather(*(_first_answer(r) for r, _ in readers_writers))
        assert outcomes.count("eof") == 0  # nobody gets an empty reply
        assert outcomes.count(503) >= 250 - 152
        assert outcomes.count("waiting") <= 152
        writer.write(request_bytes("GET", "/health"))
        assert (await read_response(reader)).status == 200
    finally:
        writer.close()
        for other in flood:
            other.close()
        await _stop_served(process)


async def _first_answer(reader: asyncio.StreamReader) -> int | str:
    """The status the server sent unasked, "eof" for a bare close, or "waiting"."""
    try:
        return (await read_response(reader, timeout_s=2.0)).status
    except TimeoutError:
        return "waiting"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "eof"


def test_serve_without_descriptors_for_clients_fails_at_start_naming_the_settings(
    tmp_path: Path,
) -> None:
    def limit_open_files() -> None:  # pragma: no cover - runs in the child
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    result = subprocess.run(
        [*COMMAND, "serve", "--listen-addr", f"127.0.0.1:{free_port()}"],
        cwd=tmp_path,
        env=clean_environ(
            MANAGEMENT_TOKEN=MANAGEMENT_TOKEN,
            DATABASE_URL=f"sqlite:///{tmp_path / 'p.db'}",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_open_files,
    )
    assert result.returncode != 0
    assert "MAX_CLIENT_CONNECTIONS=auto leaves no client connections" in result.stderr
    assert "UPSTREAM_MAX_CONNECTIONS=1000" in result.stderr
