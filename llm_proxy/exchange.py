"""`Exchange`: what one proxied call did, filled in along the middleware chain.

Middlewares never read response bodies; the handler records status, timing and byte
counts here for the instrumentation that runs after it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .allowlist import ModelPatterns


class Exchange:
    """What one proxied call did, for the instrumentation that follows it."""

    __slots__ = (
        "reached_upstream",
        "status",
        "model",
        "stream",
        "bytes_out",
        "ttfb_s",
        "upstream_started",
        "error",
        "rate_headers",
        "endpoint",
        "models",
        "path",
        "started",
        "request_id",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.reached_upstream = False
        self.status = 0
        self.model: str | None = None
        self.stream = False
        self.bytes_out = 0
        self.ttfb_s: float | None = None
        self.upstream_started = 0.0
        self.error: str | None = None
        self.rate_headers: Mapping[str, str] = {}
        self.endpoint: str | None = None
        self.models: ModelPatterns | None = None
        self.path = ""
