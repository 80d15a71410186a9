"""The processes of a benchmark run: upstream, Redis, proxies under test, wrk, and what
they cost (CPU seconds and peak RSS from /proc). Used by run.py, workers.py and
instructions.py; runs nothing by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
MANAGEMENT_TOKEN = "benchmark-management-token-0123456789"
UPSTREAM_KEY = "sk-benchmark-upstream-key-0123456789"
CHAT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
REDIS_VARIANT = "proxy-redis-limits"


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    """Block until something accepts connections on the port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), 0.2),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def nginx_config(prefix: Path, port: int, sse_port: int) -> str:
    """nginx as a static OpenAI upstream plus a pass-through to the SSE upstream."""
    chat = json.dumps(
        json.loads(
            (ROOT / "llm_proxy/devtools/fake_fixtures/chat_completion.json").read_text()
        ),
        separators=(",", ":"),
    )
    models = json.dumps(
        json.loads(
            (ROOT / "llm_proxy/devtools/fake_fixtures/models_list.json").read_text()
        ),
        separators=(",", ":"),
    )
    temp = "\n".join(
        f"    {name}_temp_path {prefix}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    upstream sse {{ server 127.0.0.1:{sse_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location = /v1/chat/completions {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            default_type application/json;
            if ($http_accept != "text/event-stream") {{
                return 200 '{chat}';
            }}
            proxy_pass http://sse;
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{models}';
        }}
    }}
}}
"""


class Stack:
    """The processes of one benchmark run; stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], cpu: int | str | None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process pinned to one CPU or a taskset list such as "0-1" (None:
        the CPUs of this script, which run.py pins to CPU 1), its output in the work
        folder."""
        log = (self.workdir / f"proc-{len(self.processes)}.log").open("wb")
        pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        process = subprocess.Popen(
            [*pin, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=self.workdir,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """SIGTERM everything, then SIGKILL what lingers."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def running_stack(prefix: str) -> Iterator[Stack]:
    """A `Stack` in a fresh work folder: its processes' logs on stderr if the run
    fails; afterwards everything stopped and the folder removed."""
    stack = Stack(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        yield stack
    except Exception:
        for log in sorted(stack.workdir.glob("proc-*.log")):
            print(f"--- {log.name}", log.read_text()[-2000:], sep="\n", file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(stack.workdir, ignore_errors=True)


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a running process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_peak_rss_mib(pid: int) -> float:
    """Summed VmHWM of the direct children of `pid` (the estimation worker), in MiB."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += peak_rss_mib(int(stat.parent.name))
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid` and its direct children, in seconds."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid` and all its descendants alive, in seconds."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            child = int(stat.parent.name)
            parents[child] = int(fields[1])
            ticks[child] = int(fields[11]) + int(fields[12])
    tree = {pid}
    while grown := {c for c, p in parents.items() if p in tree and c not in tree}:
        tree |= grown
    return sum(ticks.get(member, 0) for member in tree) / CLOCK_TICKS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def wrk_lua(path: Path, token: str, body: str) -> Path:
    """A wrk script that POSTs the chat body with the token."""
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    return path


def run_wrk(
    url: str, script: Path, connections: int, duration_s: float
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from one wrk run on CPU 1."""
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, _percentile(out, "50%"), _percentile(out, "99%")


def _percentile(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if match is None:
        raise RuntimeError(f"no {label} in wrk output:\n{out}")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def start_upstream(stack: Stack) -> int:
    """nginx (static chat completion) and the SSE upstream behind it, on CPU 1."""
    sse_port, upstream_port = free_port(), free_port()
    script = str(ROOT / "benchmarks/sse_upstream.py")
    stack.start([sys.executable, script, "--port", str(sse_port)], cpu=1)
    conf = stack.workdir / "nginx.conf"
    conf.write_text(nginx_config(stack.workdir, upstream_port, sse_port))
    prefix = ["nginx", "-e", str(stack.workdir / "error.log"), "-p", str(stack.workdir)]
    stack.start([*prefix, "-c", str(conf), "-g", "daemon off;"], cpu=1)
    wait_port(sse_port)
    wait_port(upstream_port)
    return upstream_port


def start_redis(stack: Stack) -> str:
    """A redis-server of the run's own (no persistence) on CPU 1; its URL."""
    port = free_port()
    stack.start(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no", "--dir", str(stack.workdir)],
        cpu=1,
    )
    wait_port(port)
    return f"redis://127.0.0.1:{port}/0"


def proxy_env(stack: Stack, name: str, port: int, upstream_port: int) -> dict[str, str]:
    """The environment of a proxy under test named `name` listening on `port`."""
    return {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "DATABASE_URL": f"sqlite:///{stack.workdir / name}.db",
        "OPENAI_API_URL": f"http://127.0.0.1:{upstream_port}",
        "FILE_EVENT_LOG": str(stack.workdir / f"{name}-events.jsonl"),
        "DEFAULT_RATE_LIMIT_PER_HOUR": "1000000000",
        "LOG_LEVEL": "warning",
        "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
    }


FLEET_COUNTERS = {
    "waits": "llm_proxy_fleet_lease_waits_total",
    "fallback": "llm_proxy_fleet_fallback_decisions_total",
    "failed": 'llm_proxy_fleet_lease_calls_total{outcome="failed"}',
}


def fleet_counters(base: str) -> dict[str, int]:
    """The fleet-limit counters of `FLEET_COUNTERS` on the proxy at `base`: calls that
    waited for Redis, calls the in-process fallback decided, failed lease calls."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    counters = {}
    for key, name in FLEET_COUNTERS.items():
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        counters[key] = int(float(found.group(1))) if found else 0
    return counters


def start_proxy(
    stack: Stack,
    upstream_port: int,
    variant: str | None = None,
    tree: Path | None = None,
    redis_url: str | None = None,
    *,
    prefix: Sequence[str] = (),
    start_timeout_s: float = 15.0,
) -> tuple[int, str, subprocess.Popen[bytes]]:
    """The real proxy with events on (or a `variant.py` variant, or the proxy of the
    checkout `tree`, or the proxy with fleet limits on `redis_url`), plus a token.

    `prefix` runs it under another program (valgrind), which may start slower.
    """
    port = free_port()
    name = f"proxy-{variant}" if variant else "proxy"
    if tree is not None:
        name = "proxy-reference"
    if redis_url is not None:
        name = REDIS_VARIANT
    env = proxy_env(stack, name, port, upstream_port)
    if tree is not None:  # its package first on the path, ahead of the installed one
        env["PYTHONPATH"] = str(tree.resolve())
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    command = [sys.executable, "-m", "llm_proxy", "serve"]
    if variant:
        command = [
            sys.executable,
            str(ROOT / "benchmarks/variant.py"),
            variant,
            "serve",
        ]
    process = stack.start([*prefix, *command], cpu=0, env=env)
    wait_port(port, start_timeout_s)
    token = asyncio.run(create_token(port))
    return port, token, process


async def create_token(port: int) -> str:
    """A project and a 10-hour token on the proxy at `port`; the token."""
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    base = f"http://127.0.0.1:{port}/manage"
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(
            f"{base}/projects", json={"name": "bench", "openai_api_key": UPSTREAM_KEY}
        ) as response:
            project = await response.json()
        async with session.post(
            f"{base}/tokens",
            json={"project_id": project["project_id"], "duration_minutes": 600},
        ) as response:
            return str((await response.json())["token"])
