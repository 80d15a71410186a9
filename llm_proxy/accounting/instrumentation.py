"""From finished `Exchange`s to `RequestCompleted` events, metrics and access logs.

The request path only appends the finished exchange to a bounded deque (`submit`,
synchronous, never blocks). A background task then, off the request path, parses
usage out of the captured bytes, estimates it with tiktoken in a worker process when
upstream sent none, builds and publishes the event, updates metrics and writes the
access log line. A full deque drops the exchange, counts and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from ..config import EventSettings
from ..events.model import EventBus, RateLimitedLog, RequestCompleted
from ..proxy.exchange import Exchange
from ..proxy.multipart import form_boundary, model_from_form
from ..proxy.policy import POLICY_CODES
from .metrics import Metrics, method_label, status_label
from .usage import (
    ESTIMATED,
    NOT_ANSWERED,
    PARTIAL,
    Answered,
    Usage,
    answer_from_json,
    answered_from_sse,
    decode_body,
    estimate_usage,
    json_text,
    sse_text,
    usage_from_json_tail,
    usage_from_sse,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("llm_proxy.access")

# Endpoints whose usage can be estimated from the request and the delivered text.
ESTIMABLE: Final = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
)
ESTIMATE_TIMEOUT_S: Final = 10.0
ESTIMATE_PAUSE_S: Final = 300
_YIELD_EVERY: Final = (
    16  # events processed per turn: bounds the stall a backlog adds to requests
)
# Woken by a finished call, the consumer waits this long before working: calls that end
# meanwhile are handled in the same run, and at low concurrency most requests no longer
# wait behind the work of the one before.
GATHER_S: Final = 0.005


def form_model(exchange: Exchange) -> str | None:
    """The `model` field of the multipart form the client sent, if it was seen."""
    boundary = form_boundary(exchange.form_type)
    head = exchange.form_head
    return model_from_form(head, boundary) if boundary and head else None


def account_usage(exchange: Exchange) -> Usage | None:
    """Usage that upstream reported in the captured answer, if any."""
    return account_answer(exchange)[0]


def account_answer(exchange: Exchange) -> tuple[Usage | None, Answered]:
    """Usage that upstream reported in the captured answer, and what it answered."""
    capture = exchange.capture
    if capture is None or not 200 <= exchange.status < 300:
        return None, NOT_ANSWERED
    if exchange.response_kind == "sse":
        head = capture.head_bytes()
        data = head if capture.complete else capture.tail_bytes()
        return usage_from_sse(data), answered_from_sse(head)
    if capture.complete:
        body = decode_body(capture.head_bytes(), exchange.content_encoding)
        return answer_from_json(body) if body is not None else (None, NOT_ANSWERED)
    if exchange.content_encoding:
        return None, NOT_ANSWERED
    return usage_from_json_tail(capture.tail_bytes()), NOT_ANSWERED


def needs_estimate(exchange: Exchange) -> bool:
    """Whether a call without upstream usage should be estimated."""
    return (
        exchange.capture is not None
        and 200 <= exchange.status < 300
        and exchange.path in ESTIMABLE
    )


@dataclass(frozen=True, slots=True)
class EstimateInput:
    """What an estimate needs of a call: plain data, so it can go to another process."""

    model: str | None
    request_body: bytes | None
    response_kind: str | None
    head: bytes  # the captured beginning of the answer (all of it when `complete`)
    total: int  # bytes the answer had in all
    complete: bool
    content_encoding: str | None
    partial: bool  # the call failed midway: the estimate covers what was delivered


def estimate_input(exchange: Exchange) -> EstimateInput:
    """The snapshot of `exchange` that `estimate_from` works on."""
    capture = exchange.capture
    assert capture is not None
    return EstimateInput(
        model=exchange.model,
        request_body=exchange.request_body,
        response_kind=exchange.response_kind,
        head=capture.head_bytes(),
        total=capture.total,
        complete=capture.complete,
        content_encoding=exchange.content_encoding,
        partial=exchange.error is not None,
    )


def estimate_from(data: EstimateInput) -> Usage:
    """Estimate with tiktoken (blocking: runs in the estimator's worker process)."""
    request = _request_json(data.request_body)
    text, scale = "", 1.0
    if data.response_kind == "sse":
        text = sse_text(data.head)
        scale = data.total / len(data.head) if data.head else 1.0
    elif data.complete:
        body = decode_body(data.head, data.content_encoding)
        text = json_text(body) if body is not None else ""
    source = PARTIAL if data.partial else ESTIMATED
    return estimate_usage(
        data.model, request, text, source=source, completion_scale=scale
    )


Estimator = Callable[[Exchange], Awaitable[Usage]]


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """In a worker process: exit once `parent_pid` is gone, even after a SIGKILL.

    A killed proxy cannot stop its pool, and an orphaned worker would keep its
    encodings' memory until the machine restarts.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ProcessEstimator:
    """tiktoken in one worker process, started on the first estimate.

    The encodings take about 70 MiB and loading them a second or more of CPU; in a
    child process neither lands in the proxy, and its event loop never waits on
    tiktoken for the GIL. A worker that dies is replaced on the next estimate.
    """

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def __call__(self, exchange: Exchange) -> Usage:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),  # no fork: threads
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, estimate_from, estimate_input(exchange)
            )
        except BrokenProcessPool:
            self.close()
            raise

    def worker_pids(self) -> list[int]:
        """The PIDs of the live worker processes (none before the first estimate)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return [pid for pid, process in processes.items() if process.is_alive()]

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _request_json(body: bytes | None) -> Mapping[str, Any] | None:
    if not body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _clip(data: bytes | None, limit: int) -> str | None:
    if data is None:
        return None
    return data[:limit].decode("utf-8", errors="replace")


def build_event(
    exchange: Exchange,
    usage: Usage | None,
    settings: EventSettings,
    answered: Answered = NOT_ANSWERED,
) -> RequestCompleted:
    """The event of one call; no secret (the token value) ever goes into it."""
    error_class = exchange.error_class
    if error_class is None and exchange.status >= 400:
        error_class = "UpstreamHTTPError"  # upstream's own error, passed through
    extra: dict[str, Any] = {
        "usage_source": usage.source if usage is not None else None,
        "error_class": error_class,
        "bytes_out": exchange.bytes_out,
    }
    if settings.log_bodies:
        extra.update(_bodies(exchange, settings.log_body_max_bytes))
    ttfb = exchange.ttfb_s
    return RequestCompleted(
        request_id=exchange.request_id,
        project_id=exchange.project_id,
        token_id=exchange.token_id,
        method=exchange.method,
        endpoint=exchange.endpoint or exchange.path,
        path=exchange.path,
        status_code=exchange.status,
        duration_ms=round((exchange.finished - exchange.started) * 1000, 3),
        ttfb_ms=round(ttfb * 1000, 3) if ttfb is not None else None,
        stream=exchange.stream or exchange.response_kind == "sse",
        model=answered.model or exchange.model,
        error=exchange.error,
        usage=usage.as_dict() if usage is not None else None,
        requested_model=exchange.model,
        created=answered.created,
        cache=exchange.cache,
        extra=extra,
    )


def _bodies(exchange: Exchange, limit: int) -> dict[str, Any]:
    """The request and response bodies, each cut to `limit` bytes."""
    response = None
    capture = exchange.capture
    if capture is not None:
        raw = capture.head_bytes()
        response = decode_body(raw, exchange.content_encoding) or raw
    return {
        "request_body": _clip(exchange.request_body, limit),
        "response_body": _clip(response, limit),
        "body_truncated": len(exchange.request_body or b"") > limit
        or (capture is not None and capture.total > limit),
    }


class Instrumentation:
    """Bounded hand-over from the request path to the event-building task."""

    def __init__(
        self,
        bus: EventBus,
        settings: EventSettings,
        metrics: Metrics | None = None,
        *,
        estimator: Estimator | None = None,
    ) -> None:
        self.bus = bus
        self.estimator: Estimator = estimator or ProcessEstimator()
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        self.dropped = 0
        self.processed = 0
        self._queue: deque[Exchange] = deque()
        self._estimation_paused_until = 0.0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._drop_log = RateLimitedLog(log)
        if metrics is not None:
            metrics.live.in_flight = lambda: self.in_flight
            metrics.live.accounting_dropped = lambda: self.dropped
            metrics.live.bus_stats = lambda: self.bus.stats

    def submit(self, exchange: Exchange) -> None:
        """Hand over a finished call; never blocks, drops (counted) when full."""
        if len(self._queue) >= self.settings.buffer_size:
            self.dropped += 1
            self._drop_log.warning(
                "instrumentation queue is full (%d); dropped the event of %s",
                self.settings.buffer_size,
                exchange.request_id,
            )
            return
        self._queue.append(exchange)
        if len(self._queue) == 1:
            self._wakeup.set()

    async def run(self) -> None:
        """Process calls until `close()`; what was submitted before it is drained."""
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                if not self._closing:
                    await asyncio.sleep(GATHER_S)
                continue
            await self._process(self._queue.popleft())
            self.processed += 1
            if self.processed % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let requests run during a burst

    async def _process(self, exchange: Exchange) -> None:
        try:
            if exchange.model is None and exchange.form_head:
                exchange.model = form_model(exchange)
            usage, answered = account_answer(exchange)
            if usage is None and self._may_estimate() and needs_estimate(exchange):
                usage = await self._estimate(exchange)
            event = build_event(exchange, usage, self.settings, answered)
        except Exception:  # one bad call must not stop the events of the others
            log.exception("could not build the event of %s", exchange.request_id)
            return
        self.bus.publish(event)
        self._observe(exchange, event, usage)

    def _may_estimate(self) -> bool:
        return (
            self.settings.usage_estimation
            and time.monotonic() >= self._estimation_paused_until
        )

    async def _estimate(self, exchange: Exchange) -> Usage | None:
        """tiktoken in the estimator's worker process, bounded in time.

        The first use loads (or, without TIKTOKEN_CACHE_DIR, downloads) an encoding;
        if that fails or hangs, estimation pauses for a while and the events go out
        without usage instead of waiting behind it.
        """
        try:
            return await asyncio.wait_for(self.estimator(exchange), ESTIMATE_TIMEOUT_S)
        except Exception as exc:
            self._estimation_paused_until = time.monotonic() + ESTIMATE_PAUSE_S
            log.warning(
                "token estimation failed (%s); paused for %d s. Is TIKTOKEN_CACHE_DIR "
                "set to a folder with the encodings?",
                type(exc).__name__,
                ESTIMATE_PAUSE_S,
            )
            return None

    def _observe(
        self, exchange: Exchange, event: RequestCompleted, usage: Usage | None
    ) -> None:
        if access_log.isEnabledFor(logging.INFO):
            _access_line(exchange, event)
        if self.metrics is not None:
            observe(self.metrics, exchange, usage)

    def close(self) -> None:
        """Stop after draining what was submitted so far."""
        self._closing = True
        self._wakeup.set()

    def close_estimator(self) -> None:
        """Stop the estimator's worker process (once the queue is drained)."""
        close = getattr(self.estimator, "close", None)
        if close is not None:
            close()


def _access_line(exchange: Exchange, event: RequestCompleted) -> None:
    """One access log line per proxied call: no secret, no body."""
    access_log.info(
        "%s %s %d %.1fms",
        event.method,
        event.path,
        event.status_code,
        event.duration_ms,
        extra={
            "request_id": event.request_id,
            "project_id": event.project_id,
            "token_id": event.token_id,
            "model": event.model,
            "stream": event.stream,
            "ttfb_ms": event.ttfb_ms,
            "bytes_out": exchange.bytes_out,
            "error": event.error,
        },
    )


def observe(metrics: Metrics, exchange: Exchange, usage: Usage | None) -> None:
    """Update the request, latency and token metrics for one finished call.

    Labels stay bounded: `endpoint` is the allowlist's template (or `unknown`),
    method and status go through `method_label` and `status_label`, and the model
    through the metrics' `BoundedLabel`.
    """
    endpoint = exchange.endpoint or "unknown"
    metrics.requests.labels(
        endpoint, method_label(exchange.method), status_label(exchange.status)
    ).inc()
    metrics.duration.labels(endpoint).observe(exchange.finished - exchange.started)
    if exchange.reached_upstream and exchange.upstream_finished:
        metrics.upstream_duration.labels(endpoint).observe(
            exchange.upstream_finished - exchange.upstream_started
        )
        metrics.pre_upstream.observe(exchange.upstream_started - exchange.started)
    if exchange.ttfb_s is not None:
        metrics.ttfb.labels(endpoint).observe(exchange.ttfb_s)
    if exchange.error in POLICY_CODES:
        metrics.policy_refusals.labels(exchange.error).inc()
    if usage is not None:
        _observe_tokens(metrics, exchange, usage)


def _observe_tokens(metrics: Metrics, exchange: Exchange, usage: Usage) -> None:
    """Count the call's tokens; a model the allowlist names keeps its own label."""
    named = exchange.models.patterns if exchange.models is not None else ()
    model = metrics.model_label(exchange.model or "", named)
    tokens, project = metrics.tokens, exchange.project_id or ""
    for kind, count in (
        ("prompt", usage.prompt_tokens),
        ("completion", usage.completion_tokens),
        ("cached", usage.cached_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if count:
            tokens.labels(project, model, kind, usage.source).inc(count)


INSTRUMENTATION_KEY: Final = web.AppKey("instrumentation", Instrumentation)


async def instrumentation_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the event-building task; on shutdown, drain it into the bus."""
    instrumentation = app[INSTRUMENTATION_KEY]
    task = asyncio.create_task(instrumentation.run(), name="instrumentation")
    yield
    instrumentation.close()
    try:
        async with asyncio.timeout(instrumentation.settings.flush_interval_s + 10):
            await task
    except TimeoutError:
        log.warning("instrumentation did not drain in time; events lost")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        instrumentation.close_estimator()
