"""The proxy with one part switched off, to measure what that part costs (benchmark only).

    python benchmarks/variant.py events-off serve   # everything but the events
    python benchmarks/variant.py bare serve         # only the forwarding handler

`events-off`: the /v1 chain runs in full, but finished calls are not handed to the
instrumentation: no usage parsing, no event, no metrics, no JSONL line, no usage row.
`bare`: no allowlist, token auth, rate limit, breaker or events either; every call
acts for a fixed principal whose upstream key is `BENCH_UPSTREAM_KEY`. What is left
is `proxy_handler`: the body peek, the header rules, the capture and the relay.

These are patches applied in this process only, never settings of the product: no
deployment can switch off its own accounting.
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

from llm_proxy import app as app_module
from llm_proxy.accounting.instrumentation import Instrumentation
from llm_proxy.auth.tokens import Principal
from llm_proxy.cli import main
from llm_proxy.keys import PRINCIPAL_KEY
from llm_proxy.proxy.chain import proxy_chain
from llm_proxy.proxy.exchange import Exchange
from llm_proxy.proxy.relay import proxy_handler

VARIANTS = ("events-off", "bare")


class FixedPrincipal:
    """A stage that lets every call through for one fixed principal."""

    def __init__(self, upstream_key: str) -> None:
        self.principal = Principal(
            token_id="bench",
            project_id="bench",
            upstream_authorization=f"Bearer {upstream_key}",
            rate_limit_per_hour=None,
            max_requests=None,
        )

    def enter(self, request: web.Request, exchange: Exchange) -> None:
        exchange.path = exchange.endpoint = request.path
        request[PRINCIPAL_KEY] = self.principal

    def leave(
        self, request: web.Request, exchange: Exchange, error: BaseException | None
    ) -> None:
        """Nothing to undo."""


def switch_off_events() -> None:
    """Finished calls are dropped instead of handed to the instrumentation."""
    Instrumentation.submit = lambda self, exchange: None  # type: ignore[method-assign]


def bare_handler(settings, store, breaker, instrumentation, *_):  # type: ignore[no-untyped-def]
    """`create_proxy_handler` without its stages (nor fleet limits or the cache)."""
    stage = FixedPrincipal(os.environ["BENCH_UPSTREAM_KEY"])
    return proxy_chain(instrumentation, [stage], proxy_handler)


if __name__ == "__main__":
    variant = sys.argv.pop(1)
    if variant not in VARIANTS:
        sys.exit(f"variant must be one of {VARIANTS}, not {variant!r}")
    switch_off_events()
    if variant == "bare":
        app_module.create_proxy_handler = bare_handler
    main()
