"""What CORS costs per proxied call, in instructions (callgrind), against the code before.

The proxy of this checkout and the proxy of `--before DIR` (a source tree of the
commit before, e.g. `git archive main | tar -x -C /tmp/before`) run `llm-proxy serve`
in turn under `valgrind --tool=callgrind` in front of the fake upstream, with events
on (a JSONL log, as in benchmarks/run.py); after a warm-up the counters are zeroed,
`--calls` chat completions are sent one after the other on one keep-alive connection
and the main thread's instructions are dumped (see callgrind_metrics.py). Kinds:

- before: the code before, calls without an `Origin` header;
- after: this checkout, calls without an `Origin` header (the path every server-side
  client takes);
- after-origin: this checkout, calls from an origin allowed server-wide.

    python benchmarks/callgrind_cors.py --before DIR [--calls 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callgrind_metrics import (
    Callgrind,
    alternate,
    chat,
    instructions_per_call,
    per_kind_lines,
    proxy_env,
    with_fake_upstream,
)
from run import Stack, free_port

KINDS = ("before", "after", "after-origin")
ORIGIN = "https://app.example.com"


def proxy_instructions(
    stack: Stack, kind: str, before: Path, upstream: int, calls: int, round_: int
) -> float:
    """Main-thread instructions per proxied call of the proxy of `kind`."""
    port = free_port()
    name = f"{kind}-{round_}"
    env = proxy_env(stack, name, port, upstream)
    if kind == "before":
        env["PYTHONPATH"] = str(before)
    else:
        env["CORS_ALLOWED_ORIGINS"] = ORIGIN
    command = [sys.executable, "-m", "llm_proxy", "serve"]
    proxy = Callgrind(stack.workdir / name, command, env)
    # A refused origin would not answer 200, and chat() would stop.
    extra = {"Origin": ORIGIN} if kind == "after-origin" else None
    return instructions_per_call(proxy, port, env, calls, partial(chat, extra=extra))


def measure(before: Path, calls: int, rounds: int) -> dict[str, object]:
    """Instructions per call of each kind, alternating kinds in each round."""
    per_call = with_fake_upstream(
        lambda stack, upstream: alternate(
            KINDS,
            rounds,
            lambda kind, round_: proxy_instructions(
                stack, kind, before, upstream, calls, round_
            ),
        )
    )
    medians = {kind: statistics.median(values) for kind, values in per_call.items()}
    return {
        "calls": calls,
        "instructions_per_call": per_call,
        "no_origin_extra": medians["after"] - medians["before"],
        "no_origin_ratio": medians["after"] / medians["before"],
        "origin_extra": medians["after-origin"] - medians["after"],
    }


def render(report: dict[str, object]) -> str:
    lines = per_kind_lines(report, "instructions_per_call", 12)
    lines += [
        f"  without Origin, after - before: {report['no_origin_extra']:+,.0f}"
        f" instructions per call (x{report['no_origin_ratio']:.5f})",
        f"  an allowed Origin adds: {report['origin_extra']:+,.0f} instructions per call",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.before.resolve(), args.calls, args.rounds)
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
