"""`serve --workers 2` against `--workers 1` on this machine, and what each part burnt.

Both fleets run at once with REDIS_URL (fleet limits) and the Redis event bus, each on
a Redis database of its own, unpinned: the proxy may use both CPUs, where wrk (CPU 1),
nginx and Redis (CPU 1) also run. In alternating rounds, wrk drives each at 64
connections; CPU seconds come from /proc for the proxy's process tree (supervisor,
workers, their estimation workers), nginx, Redis, and from wrk's resource usage. On a
2-core machine a second worker can only use what the load generator leaves of the
second CPU, so the report says how much of it wrk, nginx and Redis took.
Run by `benchmarks/run.py --workers-compare`.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stack import (
    CHAT_BODY,
    Stack,
    create_token,
    free_port,
    proxy_env,
    run_wrk,
    running_stack,
    start_redis,
    start_upstream,
    tree_cpu_seconds,
    wait_port,
    wrk_lua,
)

CONNECTIONS = 64
WARM_UP_S = 2


@dataclass
class Fleet:
    """One `serve --workers N` under test, and its measured rounds."""

    workers: int
    port: int
    pid: int
    token: str
    rps: list[float] = field(default_factory=list)
    proxy_cpu_s: list[float] = field(default_factory=list)
    wrk_cpu_s: list[float] = field(default_factory=list)
    upstream_cpu_s: list[float] = field(default_factory=list)  # nginx + SSE upstream
    redis_cpu_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


def start_fleet(
    stack: Stack, workers: int, upstream_port: int, redis_url: str
) -> Fleet:
    """`python -m llm_proxy serve --workers N`, on any CPU, plus a token."""
    port = free_port()
    name = f"workers-{workers}"
    env = proxy_env(stack, name, port, upstream_port)
    env |= {"REDIS_URL": redis_url, "LLM_PROXY_EVENT_BUS": "redis"}
    command = [sys.executable, "-m", "llm_proxy", "serve", "--workers", str(workers)]
    # every CPU: the driver pinned itself to CPU 1, and children inherit that
    process = stack.start(command, cpu=f"0-{(os.cpu_count() or 1) - 1}", env=env)
    wait_port(port, 60)
    token = asyncio.run(create_token(port))
    return Fleet(workers, port, process.pid, token)


def wrk_children_cpu_s() -> float:
    """CPU seconds of this script's waited-for children (each wrk run adds its own)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pids: list[int]) -> float:
    """CPU seconds of the process trees of `pids`."""
    return sum(tree_cpu_seconds(pid) for pid in pids)


def measure_round(
    fleet: Fleet, script: Path, duration_s: float, others: dict[str, list[int]]
) -> None:
    """One wrk run at 64 connections, and the CPU seconds each part used meanwhile."""
    before = {name: cpu_of(pids) for name, pids in others.items()}
    proxy_before, wrk_before = tree_cpu_seconds(fleet.pid), wrk_children_cpu_s()
    rps, _, _ = run_wrk(fleet.url, script, CONNECTIONS, duration_s)
    fleet.rps.append(rps)
    fleet.proxy_cpu_s.append(tree_cpu_seconds(fleet.pid) - proxy_before)
    fleet.wrk_cpu_s.append(wrk_children_cpu_s() - wrk_before)
    fleet.upstream_cpu_s.append(cpu_of(others["upstream"]) - before["upstream"])
    fleet.redis_cpu_s.append(cpu_of(others["redis"]) - before["redis"])
    fleet.seconds.append(max(1, round(duration_s)))


def summary(fleet: Fleet) -> dict[str, float]:
    """Medians of one fleet's rounds; CPU as a share of one CPU over the run."""
    seconds = statistics.median(fleet.seconds)

    def share(values: list[float]) -> float:
        return round(statistics.median(values) / seconds, 3)

    rps = statistics.median(fleet.rps)
    return {
        "rps_c64": round(rps, 1),
        "proxy_cpus": share(fleet.proxy_cpu_s),
        "wrk_cpus": share(fleet.wrk_cpu_s),
        "upstream_cpus": share(fleet.upstream_cpu_s),
        "redis_cpus": share(fleet.redis_cpu_s),
        "proxy_cpu_us_per_call": round(
            statistics.median(fleet.proxy_cpu_s) / (rps * seconds) * 1e6, 1
        ),
    }


def compare_workers(duration_s: float, rounds: int) -> dict[str, object]:
    """Start both fleets, measure them in alternating rounds, stop everything."""
    os.sched_setaffinity(0, {1})
    with running_stack("llm-proxy-workers-") as stack:
        upstream_port = start_upstream(stack)
        upstream = [process.pid for process in stack.processes]  # SSE, nginx
        redis_url = start_redis(stack).rsplit("/", 1)[0]
        others = {"upstream": upstream, "redis": [stack.processes[-1].pid]}
        # a Redis database each: their event streams stay apart
        fleets = [
            start_fleet(stack, n, upstream_port, f"{redis_url}/{n}") for n in (1, 2)
        ]
        scripts = {
            f.workers: wrk_lua(stack.workdir / f"w{f.workers}.lua", f.token, CHAT_BODY)
            for f in fleets
        }
        for fleet in fleets:
            run_wrk(fleet.url, scripts[fleet.workers], CONNECTIONS, WARM_UP_S)
        for _ in range(rounds):
            for fleet in fleets:
                measure_round(fleet, scripts[fleet.workers], duration_s, others)
        one, two = (summary(fleet) for fleet in fleets)
        return {
            "workers_1": one,
            "workers_2": two,
            "throughput_ratio": round(two["rps_c64"] / one["rps_c64"], 3),
            "proxy_cpu_ratio": round(two["proxy_cpus"] / one["proxy_cpus"], 3),
            "cpu_per_call_ratio": round(
                two["proxy_cpu_us_per_call"] / one["proxy_cpu_us_per_call"], 3
            ),
            "cpus": os.cpu_count(),
        }


def print_workers(report: dict[str, object]) -> None:
    """A small table: throughput and where the CPUs went, per fleet."""
    print(
        f"{'serve':<14}{'req/s @64':>11}{'proxy':>8}{'wrk':>8}{'nginx':>8}"
        f"{'redis':>8}{'µs/call':>10}   (CPUs used: 1.0 = one CPU)"
    )
    for key in ("workers_1", "workers_2"):
        row = report[key]
        assert isinstance(row, dict)
        print(
            f"--{key.replace('_', ' ', 1):<12}{row['rps_c64']:>11.1f}"
            f"{row['proxy_cpus']:>8.2f}{row['wrk_cpus']:>8.2f}"
            f"{row['upstream_cpus']:>8.2f}{row['redis_cpus']:>8.2f}"
            f"{row['proxy_cpu_us_per_call']:>10.1f}"
        )
    print(
        f"--workers 2 vs 1 on {report['cpus']} CPUs: throughput"
        f" x{report['throughput_ratio']:.3f}, proxy CPU x{report['proxy_cpu_ratio']:.3f},"
        f" CPU per call x{report['cpu_per_call_ratio']:.3f}"
    )
