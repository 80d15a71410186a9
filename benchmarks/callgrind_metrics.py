"""What the metric classes cost per proxied call, in instructions (callgrind), not time.

Wall-clock numbers on a shared machine move by a quarter from run to run; instruction
counts do not. This script compares the hand-written one-thread `FastCounter` and
`FastHistogram` (llm_proxy/accounting/metrics.py) with prometheus-client's `Counter`
and `Histogram` under the same names and label sets, in the same run:

- proxy: the whole proxy (`llm-proxy serve`, events on with a JSONL log, as in
  benchmarks/run.py) under `valgrind --tool=callgrind`, in front of the fake
  upstream; after a warm-up the counters are zeroed, `--calls` chat completions are
  sent one after the other on one keep-alive connection, and the main thread's
  instructions are dumped: instructions per proxied call, for each kind, alternating
  kinds for `--rounds` rounds;
- micro: one process per kind under callgrind runs each metric operation of a call
  (`requests.labels(..).inc()`, a labelled and an unlabelled `observe`, a token
  `inc`, and the instrumentation's whole `observe()` of one call) `--ops` times
  between a zero and a dump: instructions per operation.

The throughput estimate assumes a CPU-bound proxy: calls per second scale with
1 / instructions per call, so the extra instructions' share of the per-call total
is the throughput lost.

    python benchmarks/callgrind_metrics.py [--calls 400] [--rounds 2] [--ops 20000]

`serve KIND` and `micro KIND OPS` are the child processes this script runs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callgrind import Callgrind
from stack import (
    CHAT_BODY,
    Stack,
    create_token,
    free_port,
    proxy_env,
    wait_port,
)

KINDS = ("hand-written", "prometheus-client")
T = TypeVar("T")
WARMUP_CALLS = 100
START_TIMEOUT_S = 600.0  # importing everything under callgrind takes a while


def use_kind(kind: str) -> None:
    """Make `Metrics()` build its per-call counters and histograms of `kind`."""
    if kind == "prometheus-client":
        from prometheus_client import Counter, Histogram

        from llm_proxy.accounting import metrics

        metrics.FastCounter = Counter  # type: ignore[assignment,misc]
        metrics.FastHistogram = Histogram  # type: ignore[assignment,misc]


def serve(kind: str) -> None:
    """`llm-proxy serve` with the metric classes of `kind`."""
    use_kind(kind)
    from llm_proxy.cli import main

    sys.argv[1:] = ["serve"]
    main()


def micro(kind: str, ops: int) -> None:
    """Run each operation `ops` times when told to on stdin (the driver counts)."""
    use_kind(kind)
    run_operations(_operations(), ops)


def run_operations(operations: Mapping[str, Callable[[], object]], ops: int) -> None:
    """The child's side of `operation_instructions`."""
    print("ready", flush=True)
    for name, operation in operations.items():
        sys.stdin.readline()
        for _ in range(ops):
            operation()
        print(name, flush=True)


def _operations() -> dict[str, Callable[[], None]]:
    from llm_proxy.accounting.instrumentation import observe
    from llm_proxy.accounting.metrics import Metrics
    from llm_proxy.accounting.usage import Usage
    from llm_proxy.proxy.exchange import Exchange

    metrics = Metrics()
    exchange = Exchange("req", 100.0, "POST")
    exchange.endpoint = "/v1/chat/completions"
    exchange.status, exchange.model, exchange.project_id = 200, "gpt-4o-mini", "p1"
    exchange.reached_upstream, exchange.ttfb_s = True, 0.004
    exchange.upstream_started, exchange.upstream_finished = 100.0003, 100.004
    exchange.finished = 100.0042
    usage = Usage(11, 138, 149, 0, 128)
    endpoint = exchange.endpoint
    return {
        "requests.labels(endpoint, method, status).inc()": lambda: (
            metrics.requests.labels(endpoint, "POST", "200").inc()
        ),
        "duration.labels(endpoint).observe(s)": lambda: metrics.duration.labels(
            endpoint
        ).observe(0.0042),
        "pre_upstream.observe(s)": lambda: metrics.pre_upstream.observe(0.0003),
        "tokens.labels(project, model, kind, source).inc(n)": lambda: (
            metrics.tokens.labels("p1", "gpt-4o-mini", "prompt", "upstream").inc(11)
        ),
        "observe(metrics, exchange, usage): one call": lambda: observe(
            metrics, exchange, usage
        ),
    }


def proxy_instructions(
    stack: Stack, kind: str, upstream: int, calls: int, round_: int
) -> float:
    """Main-thread instructions per proxied call of the proxy with `kind` metrics."""
    port = free_port()
    name = f"{kind}-{round_}"
    env = proxy_env(stack, name, port, upstream)
    command = [sys.executable, __file__, "serve", kind]
    proxy = Callgrind(stack.workdir / name, command, env)
    return instructions_per_call(proxy, port, env, calls, chat)


Chat = Callable[[http.client.HTTPConnection, str, int], None]


def instructions_per_call(
    proxy: Callgrind, port: int, env: dict[str, str], calls: int, chat: Chat
) -> float:
    """Warm up, zero, make `calls` calls with `chat`, dump; the proxy is then killed."""
    events = Path(env["FILE_EVENT_LOG"])
    try:
        wait_port(port, START_TIMEOUT_S)
        token = asyncio.run(create_token(port))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        chat(connection, token, WARMUP_CALLS)
        _wait_lines(events, WARMUP_CALLS)
        proxy.zero()
        chat(connection, token, calls)
        _wait_lines(events, WARMUP_CALLS + calls)
        return proxy.dump() / calls
    finally:
        proxy.process.kill()  # the numbers are in: no need for its final dump
        proxy.process.wait()


def chat(
    connection: http.client.HTTPConnection,
    token: str,
    calls: int,
    extra: Mapping[str, str] | None = None,
    body: str = CHAT_BODY,
) -> None:
    """`calls` chat completions, one after the other; each must answer 200."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    headers.update(extra or {})
    for _ in range(calls):
        connection.request("POST", "/v1/chat/completions", body, headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"proxy answered {response.status}: {answer[:200]!r}")


def _wait_lines(path: Path, count: int, timeout_s: float = 120.0) -> None:
    """Until the JSONL log holds `count` events: the consumer has observed them all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            time.sleep(1.2)  # one more flush interval: the last calls' usage rows too
            return
        time.sleep(0.1)
    raise RuntimeError(f"{path.name} never reached {count} events")


def micro_instructions(workdir: Path, kind: str, ops: int) -> dict[str, float]:
    """Instructions per operation of each metric operation of a call."""
    command = [sys.executable, __file__, "micro", kind, str(ops)]
    return operation_instructions(workdir / f"micro-{kind}", command, ops, 5)


def operation_instructions(
    out: Path,
    command: list[str],
    ops: int,
    operations: int,
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """Instructions per operation of a `micro` child that runs `operations` of them
    `ops` times each, one after the other as told on stdin (see `micro`)."""
    child = Callgrind(out, command, env)
    process = child.process
    assert process.stdin is not None and process.stdout is not None
    counts: dict[str, float] = {}
    try:
        process.stdout.readline()  # set up: everything imported, the objects built
        for _ in range(operations):
            child.zero()
            process.stdin.write("go\n")
            process.stdin.flush()
            name = process.stdout.readline().strip()
            counts[name] = child.dump() / ops
    finally:
        process.kill()
        process.wait()
    return counts


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2])
    if sys.argv[1:2] == ["micro"]:
        return micro(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.calls, args.rounds, args.ops)
    print(json.dumps(report, indent=2) if args.json else render(report))


def measure(calls: int, rounds: int, ops: int) -> dict[str, object]:
    """Every number of the report, both kinds measured in the same run."""

    def work(stack: Stack, upstream: int) -> tuple[dict[str, Any], dict[str, Any]]:
        micro_counts = {
            kind: micro_instructions(stack.workdir, kind, ops) for kind in KINDS
        }
        per_call = alternate(
            KINDS,
            rounds,
            lambda kind, round_: proxy_instructions(
                stack, kind, upstream, calls, round_
            ),
        )
        return micro_counts, per_call

    micro_counts, per_call = with_fake_upstream(work)
    fast, prom = (statistics.median(per_call[kind]) for kind in KINDS)
    return {
        "calls": calls,
        "proxy_instructions_per_call": per_call,
        "ratio": prom / fast,
        "extra_instructions_per_call": prom - fast,
        "throughput_cost": 1 - fast / prom,
        "micro_instructions_per_op": micro_counts,
    }


def with_fake_upstream(work: Callable[[Stack, int], T]) -> T:
    """`work(stack, upstream port)` with the fake upstream running; all stopped after."""
    stack = Stack(Path(tempfile.mkdtemp(prefix="llm-proxy-callgrind-")))
    try:
        upstream = free_port()
        fake = [sys.executable, "-m", "llm_proxy", "fake-upstream"]
        stack.start([*fake, "--port", str(upstream)], cpu=1)
        wait_port(upstream)
        return work(stack, upstream)
    finally:
        stack.stop()
        shutil.rmtree(stack.workdir, ignore_errors=True)


def alternate(
    kinds: Sequence[str], rounds: int, one: Callable[[str, int], float]
) -> dict[str, list[float]]:
    """`one(kind, round)` for each kind in turn, `rounds` times: the values per kind."""
    per_kind: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(rounds):
        for kind in kinds:
            per_kind[kind].append(one(kind, round_))
    return per_kind


def per_kind_lines(report: dict[str, object], key: str, width: int) -> list[str]:
    """The report's head: instructions per call of each kind, each round."""
    per_call = report[key]
    assert isinstance(per_call, dict)
    lines = [f"proxy, main thread, one connection, {report['calls']} calls per round:"]
    for kind, values in per_call.items():
        shown = ", ".join(f"{value:,.0f}" for value in values)
        lines.append(f"  {kind:>{width}}: {shown} instructions per call")
    return lines


def render(report: dict[str, object]) -> str:
    micro_counts = report["micro_instructions_per_op"]
    assert isinstance(micro_counts, dict)
    lines = per_kind_lines(report, "proxy_instructions_per_call", 18)
    lines += [
        f"  ratio prometheus-client / hand-written: {report['ratio']:.4f}"
        f" ({report['extra_instructions_per_call']:+,.0f} instructions per call)",
        f"  throughput estimate (CPU-bound): {report['throughput_cost']:.2%} lower"
        " with prometheus-client",
        "micro, instructions per operation (hand-written -> prometheus-client):",
    ]
    fast, prom = (micro_counts[kind] for kind in KINDS)
    for name in fast:
        lines.append(f"  {name}: {fast[name]:,.0f} -> {prom[name]:,.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
