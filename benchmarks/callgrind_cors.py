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

Background work (token reloads, usage flushes, the event writer) follows the clock,
which callgrind slows, so whole-proxy counts move by about 1% from run to run; the
micro part counts what CORS adds to a call without `Origin` alone: a process of each
code (before, after) under callgrind drives `proxy_chain` with the real token auth
stage on a real token table (no event loop: the handler never awaits), `--ops` calls
between a zero and a dump.

    python benchmarks/callgrind_cors.py --before DIR [--calls 300] [--rounds 2]
                                        [--ops 20000]

`micro OPS` is the child process of the micro part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from callgrind import Callgrind
from callgrind_metrics import (
    alternate,
    chat,
    instructions_per_call,
    operation_instructions,
    per_kind_lines,
    run_operations,
    with_fake_upstream,
)
from stack import Stack, free_port, proxy_env

KINDS = ("before", "after", "after-origin")
ORIGIN = "https://app.example.com"
TOKEN = "wt-callgrind-cors-token"


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


def micro(ops: int) -> None:
    """One call through `proxy_chain` and token auth without an Origin, in the code
    this process imports (`--before`'s through PYTHONPATH, or this checkout's)."""
    run_operations(_operations(), ops)


def _operations() -> dict[str, Callable[[], object]]:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from llm_proxy.proxy.chain import Stage, TokenAuthStage, proxy_chain

    store = _token_store()
    stages: list[Stage]
    gates: tuple[Any, ...]
    try:
        from llm_proxy.config import CorsSettings
        from llm_proxy.proxy.cors import CorsPolicy
    except ImportError:  # the code before
        stages, gates = [TokenAuthStage(store)], ()
    else:
        gate = CorsPolicy(CorsSettings((ORIGIN,)), store.origin_index)
        stages, gates = [TokenAuthStage(store, gate)], (gate,)

    class Sink:
        in_flight = 0

        def submit(self, exchange: object) -> None:
            """Dropped."""

    answer = web.Response()

    async def handler(request: web.Request) -> web.StreamResponse:
        return answer

    chain = proxy_chain(Sink(), stages, handler, *gates)
    # The headers the OpenAI Python SDK sends with a chat completion, no Origin.
    sdk = ("Accept", "Accept-Encoding", "Connection", "User-Agent", "X-Stainless-Lang")
    headers = {name: "x" for name in sdk} | {"Authorization": f"Bearer {TOKEN}"}
    request = make_mocked_request("POST", "/v1/chat/completions", headers=headers)

    def call() -> None:
        coroutine = chain(request)
        assert isinstance(coroutine, Coroutine)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        raise RuntimeError("the chain awaited")

    call()  # a refusal would raise here, before any counting
    return {"a call through the chain (token auth, no Origin)": call}


def _token_store() -> Any:
    """A token table holding one token, TOKEN, of an active project."""
    from llm_proxy.auth.crypto import KeyCipher, TokenHasher
    from llm_proxy.auth.tokens import TokenStore
    from llm_proxy.storage.base import Project, Token

    key = bytes(range(32))
    store = TokenStore(TokenHasher(key), KeyCipher(key))
    now = datetime.now(UTC)
    envelope = KeyCipher(key).encrypt("sk-upstream-key-0123456789")
    store.put_project(Project("p", "bench", "", {}, envelope, "", True, now, now))
    expires = now + timedelta(days=1)
    value_hash = TokenHasher(key).hash(TOKEN)
    token = Token("t", value_hash, "", "p", expires, True, 0, None, None, now, None)
    store.put_token(token)
    return store


def measure(before: Path, calls: int, rounds: int, ops: int) -> dict[str, object]:
    """Instructions per call of each kind, alternating kinds in each round."""

    def work(stack: Stack, upstream: int) -> tuple[dict[str, Any], dict[str, Any]]:
        command = [sys.executable, __file__, "micro", str(ops)]
        micro_counts = {
            kind: sum(
                operation_instructions(
                    stack.workdir / f"micro-{kind}",
                    command,
                    ops,
                    1,
                    {"PYTHONPATH": str(before)} if kind == "before" else None,
                ).values()
            )
            for kind in ("before", "after")
        }
        per_call = alternate(
            KINDS,
            rounds,
            lambda kind, round_: proxy_instructions(
                stack, kind, before, upstream, calls, round_
            ),
        )
        return micro_counts, per_call

    micro_counts, per_call = with_fake_upstream(work)
    medians = {kind: statistics.median(values) for kind, values in per_call.items()}
    plain, with_cors = micro_counts["before"], micro_counts["after"]
    return {
        "calls": calls,
        "instructions_per_call": per_call,
        "no_origin_extra": medians["after"] - medians["before"],
        "no_origin_ratio": medians["after"] / medians["before"],
        "origin_extra": medians["after-origin"] - medians["after"],
        "micro_instructions_per_call": micro_counts,
        "micro_no_origin_extra": with_cors - plain,
    }


def render(report: dict[str, object]) -> str:
    lines = per_kind_lines(report, "instructions_per_call", 12)
    lines += [
        f"  without Origin, after - before: {report['no_origin_extra']:+,.0f}"
        f" instructions per call (x{report['no_origin_ratio']:.5f})",
        f"  an allowed Origin adds: {report['origin_extra']:+,.0f} instructions per call",
        "micro, instructions per call of proxy_chain and token auth without Origin:",
    ]
    micro_counts = report["micro_instructions_per_call"]
    assert isinstance(micro_counts, dict)
    lines += [f"  {name}: {count:,.0f}" for name, count in micro_counts.items()]
    lines.append(f"  CORS adds: {report['micro_no_origin_extra']:+,.0f}")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["micro"]:
        return micro(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = measure(args.before.resolve(), args.calls, args.rounds, args.ops)
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
