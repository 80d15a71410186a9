"""Benchmark: llm-proxy against a minimal pass-through forwarder, measured in one run.

Starts, on loopback:
- nginx as the upstream (static chat completion JSON, so the upstream is never the
  bottleneck) and, for requests that accept text/event-stream, a 20-event SSE
  upstream behind it;
- the baseline forwarder (benchmarks/baseline.py) and the real proxy (token auth,
  rate limit, allowlist, breaker, instrumentation with a JSONL event log), each
  pinned to CPU 0 in turn, while nginx, wrk and this script run on the other CPU.

Reports throughput at 64 connections, p50/p99 at concurrency 1 (wrk), added
time-to-first-byte of a 20-event stream, peak RSS, and the proxy/baseline ratios.
`--variants` adds the proxy without events and without its stages
(benchmarks/variant.py), measured in the same rounds, to show what each part costs.
`--redis-limits` adds the proxy with fleet limits on a Redis of its own (REDIS_URL,
redis-server pinned to the load generator's CPU), same rounds, and reports CPU per
proxied call with and without them (target: within 10%) and the p50 they add at one
connection (target: +0.05 ms or less).
`--reference DIR` adds the proxy of another checkout (e.g. the commit before a change,
from `git worktree add /tmp/before HEAD~3`), also in the same rounds, so a change is
judged against its own "before" on the same machine at the same moment.

    python benchmarks/run.py [--duration 8] [--rounds 2] [--variants] [--redis-limits]
                             [--reference DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
MANAGEMENT_TOKEN = "benchmark-management-token-0123456789"
UPSTREAM_KEY = "sk-benchmark-upstream-key-0123456789"
CHAT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}]}'
STREAM_BODY = (
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],'
    '"stream":true}'
)
STREAM_EVENTS = 20
# The limits every change keeps (in the same run), and the goals beyond them.
TARGETS = {
    "throughput_limit": 0.6,
    "throughput_goal": 0.8,
    "p50_added_limit_ms": 0.2,
    "p50_added_goal_ms": 0.05,
}
TARGET_TTFB_MS = 1.0
TARGET_REDIS_CPU_RATIO = 1.10  # fleet limits: CPU per call within 10 % of without
TARGET_REDIS_P50_ADDED_MS = 0.05
REDIS_VARIANT = "proxy-redis-limits"
TARGET_RSS_MIB = 80.0


@dataclass
class Result:
    """Numbers for one server under test."""

    name: str
    rps_c64: list[float] = field(default_factory=list)
    p50_ms_c1: list[float] = field(default_factory=list)
    p99_ms_c1: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    cpu_us_per_call: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    children_rss_mib: float = 0.0


@dataclass
class Server:
    """One server under test: where it listens and the token it accepts."""

    result: Result
    port: int
    process: subprocess.Popen[bytes]
    token: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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
        self, args: list[str], cpu: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process pinned to one CPU, its output in the work folder."""
        log = (self.workdir / f"proc-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *args],
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


async def ttfb_samples(url: str, token: str, count: int) -> list[float]:
    """Time to the first body chunk of `count` sequential 20-event streams, in ms.

    Each stream is read to its end and checked: a 200 with all 20 events and [DONE].
    """
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
    }
    samples: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, data=STREAM_BODY, headers=headers) as response:
                first = await response.content.readany()
                samples.append((time.perf_counter() - started) * 1000)
                body = first + await response.read()
                deltas = body.count(b'"content":"tok "')
                if response.status != 200 or deltas != STREAM_EVENTS:
                    raise RuntimeError(f"bad stream from {url}: {response.status}")
    return samples


def start_proxy(
    stack: Stack,
    upstream_port: int,
    variant: str | None = None,
    tree: Path | None = None,
    redis_url: str | None = None,
) -> tuple[int, str, subprocess.Popen[bytes]]:
    """The real proxy with events on (or a `variant.py` variant, or the proxy of the
    checkout `tree`, or the proxy with fleet limits on `redis_url`), plus a token."""
    port = free_port()
    name = f"proxy-{variant}" if variant else "proxy"
    if tree is not None:
        name = "proxy-reference"
    if redis_url is not None:
        name = REDIS_VARIANT
    env = {
        "MANAGEMENT_TOKEN": MANAGEMENT_TOKEN,
        "LISTEN_ADDR": f"127.0.0.1:{port}",
        "DATABASE_URL": f"sqlite:///{stack.workdir / name}.db",
        "OPENAI_API_URL": f"http://127.0.0.1:{upstream_port}",
        "FILE_EVENT_LOG": str(stack.workdir / f"{name}-events.jsonl"),
        "DEFAULT_RATE_LIMIT_PER_HOUR": "1000000000",
        "LOG_LEVEL": "warning",
        "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
    }
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
    process = stack.start(command, cpu=0, env=env)
    wait_port(port)
    token = asyncio.run(_create_token(port))
    return port, token, process


async def _create_token(port: int) -> str:
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


def measure(
    result: Result,
    pid: int,
    base: str,
    token: str,
    workdir: Path,
    duration_s: float,
    stream_n: int,
) -> None:
    """One round of every measurement against one server."""
    script = wrk_lua(workdir / f"{result.name}.lua", token, CHAT_BODY)
    cpu_before = cpu_seconds(pid)
    rps, _, _ = run_wrk(f"{base}/v1/chat/completions", script, 64, duration_s)
    cpu = cpu_seconds(pid) - cpu_before
    result.rps_c64.append(rps)
    calls = rps * max(1, round(duration_s))
    result.cpu_us_per_call.append(cpu / calls * 1e6 if calls else 0.0)
    _, p50, p99 = run_wrk(f"{base}/v1/chat/completions", script, 1, duration_s / 2)
    result.p50_ms_c1.append(p50)
    result.p99_ms_c1.append(p99)
    result.ttfb_ms.extend(
        asyncio.run(ttfb_samples(f"{base}/v1/chat/completions", token, stream_n))
    )


def run(
    duration_s: float,
    rounds: int,
    stream_n: int,
    variants: Sequence[str] = (),
    reference: Path | None = None,
    redis_limits: bool = False,
) -> dict[str, object]:
    """Start everything, measure both servers in alternating rounds, stop everything."""
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    stack = Stack(workdir)
    try:
        sse_port, upstream_port = free_port(), free_port()
        stack.start(
            [
                sys.executable,
                str(ROOT / "benchmarks/sse_upstream.py"),
                "--port",
                str(sse_port),
            ],
            cpu=1,
        )
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_config(workdir, upstream_port, sse_port))
        stack.start(
            [
                "nginx",
                "-e",
                str(workdir / "error.log"),
                "-p",
                str(workdir),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
            cpu=1,
        )
        wait_port(sse_port)
        wait_port(upstream_port)
        baseline_port = free_port()
        baseline = stack.start(
            [
                sys.executable,
                str(ROOT / "benchmarks/baseline.py"),
                "--port",
                str(baseline_port),
                "--upstream",
                f"http://127.0.0.1:{upstream_port}",
                "--key",
                UPSTREAM_KEY,
            ],
            cpu=0,
        )
        wait_port(baseline_port)
        servers = [Server(Result("baseline"), baseline_port, baseline, "unused")]
        for variant in (None, *variants):
            port, token, process = start_proxy(stack, upstream_port, variant)
            name = f"proxy-{variant}" if variant else "proxy"
            servers.append(Server(Result(name), port, process, token))
        if redis_limits:
            redis_port = free_port()
            stack.start(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
                + ["--save", "", "--appendonly", "no"],
                cpu=1,
            )
            wait_port(redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            port, token, process = start_proxy(
                stack, upstream_port, redis_url=redis_url
            )
            servers.append(Server(Result(REDIS_VARIANT), port, process, token))
        if reference is not None:
            port, token, process = start_proxy(stack, upstream_port, tree=reference)
            servers.append(Server(Result("proxy-reference"), port, process, token))
        for server in servers:  # warm-up: connection pools and caches
            run_wrk(
                f"{server.base}/v1/chat/completions",
                wrk_lua(workdir / "w.lua", server.token, CHAT_BODY),
                64,
                2,
            )
        for _ in range(rounds):
            for server in servers:
                measure(
                    server.result,
                    server.process.pid,
                    server.base,
                    server.token,
                    workdir,
                    duration_s,
                    stream_n,
                )
        for server in servers:
            server.result.peak_rss_mib = peak_rss_mib(server.process.pid)
            server.result.children_rss_mib = children_peak_rss_mib(server.process.pid)
        events = workdir / "proxy-events.jsonl"
        event_lines = sum(1 for _ in events.open()) if events.exists() else 0
        report = summarise(servers[0].result, servers[1].result, event_lines)
        report["variants"] = {
            server.result.name: compare_variant(servers[0].result, server.result)
            for server in servers[2:]
            if server.result.name not in ("proxy-reference", REDIS_VARIANT)
        }
        if redis_limits:
            with_redis = next(x for x in servers if x.result.name == REDIS_VARIANT)
            report["redis_limits"] = compare_redis_limits(
                servers[1].result, with_redis.result
            )
        if reference is not None:
            report["reference"] = compare_reference(
                servers[1].result, servers[-1].result
            )
        return report
    except Exception:
        for log in sorted(workdir.glob("proc-*.log")):
            print(f"--- {log.name}", log.read_text()[-2000:], sep="\n", file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def med(values: list[float]) -> float:
    """The median, rounded to 3 decimals, as every reported figure is."""
    return round(statistics.median(values), 3)


def summarise(baseline: Result, proxy: Result, event_lines: int) -> dict[str, object]:
    """Medians per server and the proxy/baseline comparison against the targets."""

    base = {
        "rps_c64": med(baseline.rps_c64),
        "p50_ms_c1": med(baseline.p50_ms_c1),
        "p99_ms_c1": med(baseline.p99_ms_c1),
        "ttfb_ms_p50": med(baseline.ttfb_ms),
        "peak_rss_mib": round(baseline.peak_rss_mib, 1),
    }
    ours = {
        "rps_c64": med(proxy.rps_c64),
        "p50_ms_c1": med(proxy.p50_ms_c1),
        "p99_ms_c1": med(proxy.p99_ms_c1),
        "ttfb_ms_p50": med(proxy.ttfb_ms),
        "peak_rss_mib": round(proxy.peak_rss_mib, 1),
        # the tiktoken worker, started by the estimates of calls cut when wrk stops
        "estimator_rss_mib": round(proxy.children_rss_mib, 1),
    }
    comparison = {
        "throughput_ratio": round(ours["rps_c64"] / base["rps_c64"], 3),
        "p50_added_ms": round(ours["p50_ms_c1"] - base["p50_ms_c1"], 3),
        "p99_added_ms": round(ours["p99_ms_c1"] - base["p99_ms_c1"], 3),
        "ttfb_added_ms": round(ours["ttfb_ms_p50"] - base["ttfb_ms_p50"], 3),
        "events_written": event_lines,
    }
    verdict = {
        "throughput >= 0.6x baseline (limit)": comparison["throughput_ratio"]
        >= TARGETS["throughput_limit"],
        "throughput >= 0.8x baseline (goal)": comparison["throughput_ratio"]
        >= TARGETS["throughput_goal"],
        "p50 c=1 <= baseline + 0.2 ms (limit)": comparison["p50_added_ms"]
        <= TARGETS["p50_added_limit_ms"],
        "p50 c=1 <= baseline + 0.05 ms (goal)": comparison["p50_added_ms"]
        <= TARGETS["p50_added_goal_ms"],
        "added TTFB <= 1 ms": comparison["ttfb_added_ms"] <= TARGET_TTFB_MS,
        "proxy RSS <= 80 MiB": ours["peak_rss_mib"] <= TARGET_RSS_MIB,
    }
    return {
        "baseline": base,
        "proxy": ours,
        "comparison": comparison,
        "targets_met": verdict,
        "raw": {
            "baseline": asdict(baseline) | {"ttfb_ms": []},
            "proxy": asdict(proxy) | {"ttfb_ms": []},
        },
    }


def compare_variant(baseline: Result, variant: Result) -> dict[str, float]:
    """A variant's throughput and p50, against the baseline of the same rounds."""
    rps = med(variant.rps_c64)
    return {
        "rps_c64": rps,
        "throughput_ratio": round(rps / med(baseline.rps_c64), 3),
        "p50_added_ms": round(med(variant.p50_ms_c1) - med(baseline.p50_ms_c1), 3),
    }


def compare_redis_limits(proxy: Result, with_redis: Result) -> dict[str, object]:
    """The proxy with fleet limits on Redis against the same proxy without them."""
    without, with_ = med(proxy.cpu_us_per_call), med(with_redis.cpu_us_per_call)
    ratio = round(with_ / without, 3) if without else 0.0
    p50_added = round(med(with_redis.p50_ms_c1) - med(proxy.p50_ms_c1), 3)
    return {
        "cpu_us_per_call_without": without,
        "cpu_us_per_call_with": with_,
        "cpu_ratio": ratio,
        "rps_c64_without": med(proxy.rps_c64),
        "rps_c64_with": med(with_redis.rps_c64),
        "p50_added_ms": p50_added,
        "targets_met": {
            "cpu per call within 10%": ratio <= TARGET_REDIS_CPU_RATIO,
            "p50 added <= 0.05 ms": p50_added <= TARGET_REDIS_P50_ADDED_MS,
        },
    }


def compare_reference(proxy: Result, reference: Result) -> dict[str, float]:
    """This checkout's proxy against the reference checkout's, same rounds."""
    return {
        "rps_c64": med(reference.rps_c64),
        "throughput_vs_reference": round(
            med(proxy.rps_c64) / med(reference.rps_c64), 3
        ),
        "p50_vs_reference_ms": round(
            med(proxy.p50_ms_c1) - med(reference.p50_ms_c1), 3
        ),
        "ttfb_vs_reference_ms": round(med(proxy.ttfb_ms) - med(reference.ttfb_ms), 3),
    }


def print_report(report: dict[str, object]) -> None:
    """A small human-readable table."""
    base, ours = report["baseline"], report["proxy"]
    assert isinstance(base, dict) and isinstance(ours, dict)
    print(f"{'metric':<22}{'baseline':>12}{'llm-proxy':>12}{'ratio/delta':>14}")
    for key, label in (
        ("rps_c64", "req/s @64 conns"),
        ("p50_ms_c1", "p50 ms @1 conn"),
        ("p99_ms_c1", "p99 ms @1 conn"),
        ("ttfb_ms_p50", "TTFB ms (20 ev)"),
        ("peak_rss_mib", "peak RSS MiB"),
    ):
        b, o = base[key], ours[key]
        delta = f"x{o / b:.3f}" if key == "rps_c64" else f"{o - b:+.3f}"
        print(f"{label:<22}{b:>12.3f}{o:>12.3f}{delta:>14}")
    print("events written:", report["comparison"]["events_written"])  # type: ignore[index]
    print("estimation worker peak RSS MiB:", ours["estimator_rss_mib"])
    targets = report["targets_met"]
    assert isinstance(targets, dict)
    for name, ok in targets.items():
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    variants = report.get("variants") or {}
    assert isinstance(variants, dict)
    for name, numbers in variants.items():
        print(
            f"{name:<22}{numbers['rps_c64']:>12.1f} req/s"
            f"  x{numbers['throughput_ratio']:.3f}"
            f"  p50 {numbers['p50_added_ms']:+.3f} ms"
        )
    redis = report.get("redis_limits")
    if isinstance(redis, dict):
        print(
            f"{'fleet limits (Redis)':<22}CPU/call {redis['cpu_us_per_call_with']:.1f} µs"
            f" vs {redis['cpu_us_per_call_without']:.1f} µs (x{redis['cpu_ratio']:.3f}),"
            f" p50 {redis['p50_added_ms']:+.3f} ms"
        )
        for name, ok in redis["targets_met"].items():
            print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    reference = report.get("reference")
    if isinstance(reference, dict):
        print(
            f"{'reference checkout':<22}{reference['rps_c64']:>12.1f} req/s;"
            f" this checkout x{reference['throughput_vs_reference']:.3f},"
            f" p50 {reference['p50_vs_reference_ms']:+.3f} ms,"
            f" TTFB {reference['ttfb_vs_reference_ms']:+.3f} ms"
        )


def main() -> None:
    """Parse flags, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds per wrk run"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument(
        "--streams", type=int, default=200, help="streams per TTFB sample"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also measure the proxy without events and without its stages"
        " (benchmarks/variant.py), to see what each part costs",
    )
    parser.add_argument(
        "--redis-limits",
        action="store_true",
        help="also measure the proxy with fleet limits on a Redis of its own"
        " (needs redis-server), same rounds: CPU per call and p50 with vs without",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="DIR",
        help="also measure the proxy of the checkout DIR (a 'before'), same rounds",
    )
    args = parser.parse_args()
    tools = ["nginx", "wrk", "taskset"] + (
        ["redis-server"] if args.redis_limits else []
    )
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(
                f"benchmark needs {tool} (apt-get install {tool if tool != 'taskset' else 'util-linux'})"
            )
    variants = ("events-off", "bare") if args.variants else ()
    report = run(
        args.duration,
        args.rounds,
        args.streams,
        variants,
        args.reference,
        args.redis_limits,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
