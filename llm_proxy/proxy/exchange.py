"""`Exchange`: what one proxied call did, filled in along the middleware chain.

Middlewares never read response bodies; the handler records status, timing, byte
counts and bounded captures here for the instrumentation that runs after it. Times are
`time.perf_counter()` values; `ttfb_s` is from `started` to the first body byte sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .allowlist import ModelPatterns
from .capture import ResponseCapture

if TYPE_CHECKING:
    from .cache_stage import CachePlan


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
        "method",
        "finished",
        "upstream_finished",
        "project_id",
        "token_id",
        "error_class",
        "request_body",
        "form_head",
        "form_type",
        "usage_injected",
        "capture",
        "response_kind",
        "content_encoding",
        "origin",
        "cors",
        "cache_plan",
        "cache",
    )

    def __init__(self, request_id: str, started: float, method: str = "GET") -> None:
        self.request_id = request_id
        self.started = started
        self.method = method
        self.finished = started
        self.upstream_finished = 0.0
        self.project_id: str | None = None
        self.token_id: str | None = None
        self.error_class: str | None = None
        # The client's JSON body when it was small enough to read (≤ 1 MiB).
        self.request_body: bytes | None = None
        # The first bytes of a multipart body and its Content-Type (the form's model).
        self.form_head: bytes | None = None
        self.form_type: str | None = None
        self.usage_injected = False
        self.capture: ResponseCapture | None = None
        self.response_kind: str | None = None  # "json" | "sse" | None
        self.content_encoding: str | None = None
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
        self.origin: str | None = None  # the request's Origin header (cors.py)
        self.cors: str | None = None  # the Origin, while its answer gets CORS headers
        # With RESPONSE_CACHE: the call's lookup and keep, and their outcome for the
        # event ("hit" | "miss" | "bypass"); None while the cache takes no part.
        self.cache_plan: CachePlan | None = None
        self.cache: str | None = None
