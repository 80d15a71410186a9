"""Benchmark: llm-proxy against a minimal pass-through forwarder, measured in one run.

Starts, on loopback:
- nginx as the upstream (static chat completion JSON, so the upstream is never the
  bottleneck) and, for requests that accept text/event-stream, a 20-event SSE
  upstream behind it;
- the baseline forwarder (benchmarks/baseline.py) and the real proxy (token auth,
  rate limit, allowlist, breaker, instrumentation with a JSONL event log), each
  pinned to CPU 0 in turn, while nginx, wrk and this script run on the other CPU.

Reports throughput at 64 connections, p50/p99 at concurrency 1 (wrk, in one-second
slices that the servers take in turns; what a server adds is the median of its
slice-by-slice differences), added time-to-first-byte of a 20-event stream, peak RSS,
and the proxy/baseline ratios.
`--variants` adds the proxy without events and without its stages
(benchmarks/variant.py), measured in the same rounds, to show what each part costs.
`--redis-limits` adds the proxy with fleet limits on a Redis of its own (REDIS_URL,
redis-server pinned to the load generator's CPU), same rounds, and reports CPU per
proxied call with and without them (target: within 10%) and the p50 they add at one
connection (target: +0.05 ms or less).
It also says how many calls waited for Redis and how many the in-process fallback
decided (Redis counted as down), which would make the comparison moot.
`--reference DIR` adds the proxy of another checkout (e.g. the commit before a change,
from `git worktree add /tmp/before HEAD~3`), also in the same rounds, so a change is
judged against its own "before" on the same machine at the same moment.
`--workers-compare` measures, instead of all that, `serve --workers 2` against
`--workers 1` (benchmarks/workers_compare.py). `benchmarks/instructions.py` counts
callgrind instructions per call with and without fleet limits, which a loaded
machine does not blur.

    python benchmarks/run.py [--duration 8] [--rounds 2] [--variants] [--redis-limits]
                             [--reference DIR] [--workers-compare] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from stack import (
    CHAT_BODY,
    REDIS_VARIANT,
    ROOT,
    UPSTREAM_KEY,
    children_peak_rss_mib,
    cpu_seconds,
    fleet_counters,
    free_port,
    peak_rss_mib,
    run_wrk,
    running_stack,
    start_proxy,
    start_redis,
    start_upstream,
    wait_port,
    wrk_lua,
)
from workers_compare import compare_workers, print_workers

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
LATENCY_SLICES_PER_ROUND = 4  # one-second c=1 slices per server and round
TARGET_REDIS_CPU_RATIO = 1.10  # fleet limits: CPU per call within 10 % of without
TARGET_REDIS_P50_ADDED_MS = 0.05
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
    result.ttfb_ms.extend(
        asyncio.run(ttfb_samples(f"{base}/v1/chat/completions", token, stream_n))
    )


def measure_latency(servers: Sequence[Server], workdir: Path, slices: int) -> None:
    """p50 and p99 at one connection, in `slices` one-second wrk runs per server.

    The servers take turns slice by slice, so that slice `i` of each was measured
    within seconds of the others: on a VM the latency of every server drifts by a
    tenth of a millisecond from one second to the next, and a difference taken
    slice by slice (`paired_added`) cancels what they share.
    """
    for _ in range(slices):
        for server in servers:
            result = server.result
            script = wrk_lua(workdir / f"{result.name}.lua", server.token, CHAT_BODY)
            _, p50, p99 = run_wrk(f"{server.base}/v1/chat/completions", script, 1, 1)
            result.p50_ms_c1.append(p50)
            result.p99_ms_c1.append(p99)


def paired_added(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """The median of slice-by-slice differences `ours[i] - theirs[i]`, rounded."""
    return med([a - b for a, b in zip(ours, theirs, strict=True)])


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
    with running_stack("llm-proxy-bench-") as stack:
        upstream_port = start_upstream(stack)
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
            redis_url = start_redis(stack)
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
                wrk_lua(stack.workdir / "w.lua", server.token, CHAT_BODY),
                64,
                2,
            )
        limited = [x.base for x in servers if x.result.name == REDIS_VARIANT]
        fleet_before = fleet_counters(limited[0]) if limited else {}
        for _ in range(rounds):
            for server in servers:
                measure(
                    server.result,
                    server.process.pid,
                    server.base,
                    server.token,
                    stack.workdir,
                    duration_s,
                    stream_n,
                )
        measure_latency(servers, stack.workdir, rounds * LATENCY_SLICES_PER_ROUND)
        for server in servers:
            server.result.peak_rss_mib = peak_rss_mib(server.process.pid)
            server.result.children_rss_mib = children_peak_rss_mib(server.process.pid)
        events = stack.workdir / "proxy-events.jsonl"
        event_lines = sum(1 for _ in events.open()) if events.exists() else 0
        report = summarise(servers[0].result, servers[1].result, event_lines)
        report["variants"] = {
            server.result.name: compare_variant(servers[0].result, server.result)
            for server in servers[2:]
            if server.result.name not in ("proxy-reference", REDIS_VARIANT)
        }
        if redis_limits:
            with_redis = next(x for x in servers if x.result.name == REDIS_VARIANT)
            limits = compare_redis_limits(servers[1].result, with_redis.result)
            fleet_after = fleet_counters(with_redis.base)
            limits["fleet_counters_in_rounds"] = {
                key: fleet_after[key] - fleet_before[key] for key in fleet_after
            }
            report["redis_limits"] = limits
        if reference is not None:
            report["reference"] = compare_reference(
                servers[1].result, servers[-1].result
            )
        return report


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
        "p50_added_ms": paired_added(proxy.p50_ms_c1, baseline.p50_ms_c1),
        "p99_added_ms": paired_added(proxy.p99_ms_c1, baseline.p99_ms_c1),
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
        "p50_added_ms": paired_added(variant.p50_ms_c1, baseline.p50_ms_c1),
    }


def compare_redis_limits(proxy: Result, with_redis: Result) -> dict[str, object]:
    """The proxy with fleet limits on Redis against the same proxy without them."""
    without, with_ = med(proxy.cpu_us_per_call), med(with_redis.cpu_us_per_call)
    ratio = round(with_ / without, 3) if without else 0.0
    p50_added = paired_added(with_redis.p50_ms_c1, proxy.p50_ms_c1)
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
        "p50_vs_reference_ms": paired_added(proxy.p50_ms_c1, reference.p50_ms_c1),
        "ttfb_vs_reference_ms": round(med(proxy.ttfb_ms) - med(reference.ttfb_ms), 3),
    }


def print_report(report: dict[str, object]) -> None:
    """A small human-readable table."""
    base, ours, comparison = report["baseline"], report["proxy"], report["comparison"]
    assert isinstance(base, dict) and isinstance(ours, dict)
    assert isinstance(comparison, dict)
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
        if key in ("p50_ms_c1", "p99_ms_c1"):  # slice by slice, not of the medians
            delta = f"{comparison[key.replace('ms_c1', 'added_ms')]:+.3f}"
        print(f"{label:<22}{b:>12.3f}{o:>12.3f}{delta:>14}")
    print("events written:", comparison["events_written"])
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
        counters = redis["fleet_counters_in_rounds"]
        print(
            f"{'':<22}calls that waited for Redis: {counters['waits']} (after idling),"
            f" decided by the fallback: {counters['fallback']}"
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
        "--workers-compare",
        action="store_true",
        help="instead: serve --workers 2 against --workers 1 (REDIS_URL, both CPUs),"
        " throughput at 64 connections and the CPU each part used",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="DIR",
        help="also measure the proxy of the checkout DIR (a 'before'), same rounds",
    )
    args = parser.parse_args()
    tools = ["nginx", "wrk", "taskset"] + (
        ["redis-server"] if args.redis_limits or args.workers_compare else []
    )
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(
                f"benchmark needs {tool} (apt-get install {tool if tool != 'taskset' else 'util-linux'})"
            )
    if args.workers_compare:
        workers = compare_workers(args.duration, args.rounds)
        if args.json:
            print(json.dumps(workers, indent=2))
        else:
            print_workers(workers)
        return
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
