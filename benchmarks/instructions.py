"""Instructions per proxied call under callgrind: the proxy with and without fleet limits.

CPU seconds on a shared, loaded machine swing by tens of percent from run to run; the
instruction counts of valgrind's callgrind repeat to a per cent or two (kernel time,
such as the loopback sends, is not in them). Starts nginx as the upstream and a Redis
of its own (CPU 1), then the proxy under callgrind (`callgrind.Callgrind`), once
without and once with REDIS_URL. For each concurrency it warms the proxy up, zeroes
the counters, sends `--calls` chat completions from an aiohttp client with at most
that many in flight, dumps the main thread's counters (where the event loop, and so
all of the fleet-limit code, runs) and divides by the calls. The counts include the
loop's background work in that window (usage flush, lease housekeeping). With Redis
it also reports the lease script runs per call (Redis INFO commandstats) and the
calls that waited for one (`llm_proxy_fleet_lease_waits_total`): 0 at steady state.
A window in which Redis counted as down (the fallback decided) is an error.

    python benchmarks/instructions.py [--calls 1000] [--concurrency 1 64] [--json]
                                      [--reference DIR]

`--reference DIR` also counts the proxy of another checkout (without Redis), e.g. the
commit before a change (`git worktree add <dir> <commit>`).

Needs valgrind, nginx and redis-server. Each proxy start under valgrind takes about
a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis
from callgrind import Callgrind
from stack import (
    CHAT_BODY,
    REDIS_VARIANT,
    Stack,
    create_token,
    fleet_counters,
    free_port,
    proxy_env,
    running_stack,
    start_redis,
    start_upstream,
    wait_port,
)

WARM_UP_CALLS = 300
REFERENCE = "proxy-reference"
START_TIMEOUT_S = 300.0


@dataclass
class Count:
    """One measured window of one proxy at one concurrency."""

    server: str
    concurrency: int
    calls: int
    instructions: int
    lease_runs: int | None = None  # EVALSHA calls Redis answered in the window
    waits: int | None = None  # calls that waited for a lease script run

    @property
    def per_call(self) -> float:
        return self.instructions / self.calls


async def send_calls(base: str, token: str, calls: int, concurrency: int) -> None:
    """`calls` chat completions, at most `concurrency` in flight; each must be a 200."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with gate:
                url = f"{base}/v1/chat/completions"
                async with session.post(url, data=CHAT_BODY, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url} answered {r.status}")

        await asyncio.gather(*(one() for _ in range(calls)))


def lease_runs(redis_url: str) -> int:
    """EVALSHA calls the run's Redis has answered so far."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def measure_server(
    stack: Stack,
    upstream_port: int,
    redis_url: str | None,
    calls: int,
    concurrencies: list[int],
    tree: Path | None = None,
) -> list[Count]:
    """Start one proxy (of the checkout `tree`, if given) under callgrind and count
    each concurrency's window."""
    name = REDIS_VARIANT if redis_url else "proxy"
    if tree is not None:
        name = REFERENCE
    port = free_port()
    env = proxy_env(stack, name, port, upstream_port)
    if redis_url:
        env["REDIS_URL"] = redis_url
    if tree is not None:  # its package first on the path, ahead of this one
        env["PYTHONPATH"] = str(tree.resolve())
    command = [sys.executable, "-m", "llm_proxy", "serve"]
    proxy = Callgrind(stack.workdir / name, command, env)
    try:
        wait_port(port, START_TIMEOUT_S)
        token = asyncio.run(create_token(port))
        base = f"http://127.0.0.1:{port}"
        return [
            count_window(proxy, base, token, redis_url, calls, concurrency, name)
            for concurrency in concurrencies
        ]
    finally:
        proxy.process.kill()  # the numbers are in: no need for its final dump
        proxy.process.wait()


def count_window(
    proxy: Callgrind,
    base: str,
    token: str,
    redis_url: str | None,
    calls: int,
    concurrency: int,
    name: str,
) -> Count:
    """Warm up, then the main thread's instructions of `calls` calls."""
    asyncio.run(send_calls(base, token, WARM_UP_CALLS, concurrency))
    runs = lease_runs(redis_url) if redis_url else 0
    before = fleet_counters(base)
    proxy.zero()
    asyncio.run(send_calls(base, token, calls, concurrency))
    count = Count(name, concurrency, calls, proxy.dump())
    if redis_url:
        after = fleet_counters(base)
        if after["fallback"] > before["fallback"] or after["failed"] > before["failed"]:
            raise RuntimeError(f"Redis counted as down in the window: {after}")
        count.lease_runs = lease_runs(redis_url) - runs
        count.waits = after["waits"] - before["waits"]
    return count


def run(
    calls: int, concurrencies: list[int], reference: Path | None = None
) -> list[Count]:
    """Both proxies (and the reference's), one after the other, on one upstream and
    one Redis."""
    os.sched_setaffinity(0, {1})
    os.environ["PYTHONHASHSEED"] = "0"  # the same dict layouts, run after run
    # callgrind runs the proxy ~50 times slower: so must the deadline of a lease call
    # be, or Redis counts as down and the in-process fallback decides instead
    os.environ["REDIS_LIMITS_TIMEOUT"] = "10"
    with running_stack("llm-proxy-instructions-") as stack:
        upstream_port = start_upstream(stack)
        redis_url = start_redis(stack)
        counts = []
        for url in (None, redis_url):
            counts += measure_server(stack, upstream_port, url, calls, concurrencies)
        if reference is not None:
            counts += measure_server(
                stack, upstream_port, None, calls, concurrencies, reference
            )
        return counts


def report(counts: list[Count]) -> dict[str, object]:
    """Instructions per call by concurrency, and the with/without ratio."""
    rows: dict[str, object] = {}
    for concurrency in sorted({c.concurrency for c in counts}):
        plain, limited = (
            next(c for c in counts if c.concurrency == concurrency and c.server == name)
            for name in ("proxy", REDIS_VARIANT)
        )
        rows[f"c{concurrency}"] = {
            "calls": plain.calls,
            "instructions_per_call_without": round(plain.per_call),
            "instructions_per_call_with": round(limited.per_call),
            "ratio": round(limited.per_call / plain.per_call, 4),
            "lease_runs_per_call": round((limited.lease_runs or 0) / limited.calls, 4),
            "calls_that_waited": limited.waits,
        }
        before = [
            c for c in counts if c.concurrency == concurrency and c.server == REFERENCE
        ]
        if before:
            row = rows[f"c{concurrency}"]
            assert isinstance(row, dict)
            row["instructions_per_call_reference"] = round(before[0].per_call)
            row["ratio_to_reference"] = round(plain.per_call / before[0].per_call, 4)
    return rows


def main() -> None:
    """Parse flags, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per window")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 64], help="calls in flight"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="DIR",
        help="also count the proxy of the checkout DIR (a 'before'), without Redis",
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"this measurement needs {tool}")
    rows = report(run(args.calls, args.concurrency, args.reference))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'conns':>5}{'without':>14}{'with Redis':>14}{'ratio':>8}"
        f"{'runs/call':>11}{'waited':>8}   (instructions per call)"
    )
    for name, row in rows.items():
        assert isinstance(row, dict)
        print(
            f"{name[1:]:>5}{row['instructions_per_call_without']:>14,}"
            f"{row['instructions_per_call_with']:>14,}{row['ratio']:>8.3f}"
            f"{row['lease_runs_per_call']:>11.4f}{row['calls_that_waited']:>8}"
        )
        if "ratio_to_reference" in row:
            print(
                f"{'':>5}reference {row['instructions_per_call_reference']:,}:"
                f" this checkout x{row['ratio_to_reference']:.3f} (without Redis)"
            )


if __name__ == "__main__":
    main()
