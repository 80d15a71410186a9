"""What a token's policy costs per proxied call, in instructions (callgrind), not time.

One proxy (`llm-proxy serve`, events on with a JSONL log, as in benchmarks/run.py)
runs under `valgrind --tool=callgrind` in front of the fake upstream, with two tokens
of one project: one without a policy, and one with every part of it (a bound
`user_id`, two allowed models, one of them a glob, an output-token cap, no
streaming). Both send the same call (the bound header and a `max_tokens` under the
cap included) one after the other on one keep-alive connection. After a warm-up the
counters are zeroed, `--calls` calls of one token are sent and the main thread's
instructions are dumped; the tokens alternate for `--rounds` rounds, in the same run.
The periodic token reload and the retention purge are off (`QUIET`); the events, their
JSONL log, the usage rows and the request-count flushes stay on.

`--reference DIR` measures the proxy of another checkout too (e.g. the commit before
the policy, from `git worktree add <dir> <commit>`), with the token without policy:
what the policy's hooks cost a token that has none.

The throughput estimate assumes a CPU-bound proxy: calls per second scale with
1 / instructions per call.

    python benchmarks/callgrind_policy.py [--calls 400] [--rounds 5] [--reference DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callgrind import Callgrind
from callgrind_metrics import (
    START_TIMEOUT_S,
    WARMUP_CALLS,
    _wait_lines,
    alternate,
    chat,
    per_kind_lines,
    with_fake_upstream,
)
from stack import MANAGEMENT_TOKEN, UPSTREAM_KEY, Stack, free_port, proxy_env, wait_port

USER = "bench-user-0001"
POLICY = {
    "bind": {"user_id": USER},
    "allowed_models": ["gpt-4.1-*", "gpt-4o-mini"],
    "max_output_tokens_cap": 1000,
    "allow_streaming": False,
}
# Timers whose work does not depend on the calls, off for the run: they would add
# their instructions to whichever block of calls they fire in.
QUIET = {"TOKEN_REFRESH_INTERVAL": "86400", "PURGE_INTERVAL": "off"}
BODY = (
    '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],'
    '"max_tokens":100}'
)
KINDS = ("this/none", "this/full", "reference/none")
# Every call sends the bound header, so both tokens' calls are the same bytes.
CALL = partial(chat, extra={"X-Proxy-User-Id": USER}, body=BODY)


class Proxy:
    """One proxy under callgrind, its tokens by kind, and the events it has logged."""

    def __init__(self, stack: Stack, name: str, upstream: int, tree: Path | None):
        self.port = free_port()
        env = proxy_env(stack, name, self.port, upstream) | QUIET
        self.events = Path(env["FILE_EVENT_LOG"])
        if tree is not None:  # its package first on the path, ahead of this one
            env["PYTHONPATH"] = str(tree.resolve())
        command = [sys.executable, "-m", "llm_proxy", "serve"]
        self.callgrind = Callgrind(stack.workdir / name, command, env)
        try:
            wait_port(self.port, START_TIMEOUT_S)
            self.tokens = asyncio.run(_tokens(self.port, policy=tree is None))
        except BaseException:
            self.stop()
            raise
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        self.sent = 0

    def call(self, token: str, count: int) -> None:
        """`count` chat completions with `token`, then until their events are in."""
        CALL(self.connection, token, count)
        self.sent += count
        _wait_lines(self.events, self.sent)

    def per_call(self, token: str, calls: int) -> float:
        """Main-thread instructions per call of `token`, its events included.

        A fresh connection first (the proxy closes one left idle while the other
        token or proxy was measured), opened by one call outside the count.
        """
        self.connection.close()
        self.call(token, 1)
        self.callgrind.zero()
        self.call(token, calls)
        return self.callgrind.dump() / calls

    def stop(self) -> None:
        self.callgrind.process.kill()
        self.callgrind.process.wait()


async def _tokens(port: int, *, policy: bool) -> dict[str, str]:
    """A project and its tokens: "none" without a policy, "full" with all of it."""
    auth = {"Authorization": f"Bearer {MANAGEMENT_TOKEN}"}
    base = f"http://127.0.0.1:{port}/manage"
    async with aiohttp.ClientSession(headers=auth, raise_for_status=True) as session:
        project = {"name": "bench", "openai_api_key": UPSTREAM_KEY}
        async with session.post(f"{base}/projects", json=project) as response:
            project_id = (await response.json())["project_id"]
        kinds: dict[str, dict[str, Any]] = {"none": {}}
        if policy:
            kinds["full"] = POLICY
        tokens = {}
        for kind, fields in kinds.items():
            body = {"project_id": project_id, "duration_minutes": 600, **fields}
            async with session.post(f"{base}/tokens", json=body) as response:
                tokens[kind] = str((await response.json())["token"])
        return tokens


def measure(calls: int, rounds: int, reference: Path | None) -> dict[str, Any]:
    """Instructions per call of each token (and the reference), in one run."""

    def work(stack: Stack, upstream: int) -> dict[str, list[float]]:
        proxies: dict[str, Proxy] = {}
        try:
            proxies["this"] = Proxy(stack, "this", upstream, None)
            if reference is not None:
                proxies["reference"] = Proxy(stack, "reference", upstream, reference)
            kinds = [kind for kind in KINDS if kind.split("/")[0] in proxies]
            for kind in kinds:
                name, token = kind.split("/")
                proxies[name].call(proxies[name].tokens[token], WARMUP_CALLS)

            def one(kind: str, round_: int) -> float:
                name, token = kind.split("/")
                return proxies[name].per_call(proxies[name].tokens[token], calls)

            return alternate(kinds, rounds, one)
        finally:
            for proxy in proxies.values():
                proxy.stop()

    counts = with_fake_upstream(work)
    return {"calls": calls, "instructions_per_call": counts, **_compare(counts)}


def _compare(counts: dict[str, list[float]]) -> dict[str, float]:
    """Extra instructions and the throughput they cost, by medians."""
    none, full = (statistics.median(counts[f"this/{k}"]) for k in ("none", "full"))
    report = {
        "full_policy_extra_instructions": full - none,
        "full_policy_throughput_cost": 1 - none / full,
    }
    if "reference/none" in counts:
        before = statistics.median(counts["reference/none"])
        report["no_policy_extra_instructions"] = none - before
        report["no_policy_throughput_cost"] = 1 - before / none
    return report


def render(report: dict[str, Any]) -> str:
    lines = per_kind_lines(report, "instructions_per_call", 15)
    lines.append(
        f"  full policy vs none: {report['full_policy_extra_instructions']:+,.0f}"
        f" instructions per call, {report['full_policy_throughput_cost']:.2%} of"
        " throughput (CPU-bound)"
    )
    if "no_policy_extra_instructions" in report:
        lines.append(
            f"  no policy vs reference: {report['no_policy_extra_instructions']:+,.0f}"
            f" instructions per call, {report['no_policy_throughput_cost']:.2%} of"
            " throughput"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.calls, args.rounds, args.reference)
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
