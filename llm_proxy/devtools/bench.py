"""`llm-proxy bench`: a load generator that treats the proxy as a black box.

One pooled `ClientSession` (connector limit = concurrency) drives `concurrency` workers;
every time is `perf_counter_ns` taken on this client only. Headers, URL and body bytes
are built once. With `compare_url`, requests alternate between the two base URLs so both
see the same load at the same moment, and the report gives the added latency.

The first answer of the first target tells the token's hourly limit
(`x-ratelimit-limit-requests` / `x-ratelimit-remaining-requests`, sent by the proxy);
when the run would use up what is left, a warning says so at once, while there is
still time to stop it.

`--mock` starts its targets as child processes (`bench_mock.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..domain_errors import ProxyError
from .bench_report import (
    BenchReport,
    Samples,
    added_latency,
    refusal_warning,
    target_report,
)

DEFAULT_ENDPOINT: Final = "/v1/chat/completions"
DEFAULT_MODEL: Final = "gpt-4o-mini"
PROGRESS_INTERVAL_S: Final = 0.25
LIMIT_HEADER: Final = "x-ratelimit-limit-requests"
REMAINING_HEADER: Final = "x-ratelimit-remaining-requests"

Warn = Callable[[str], None]


class Progress(Protocol):
    """Receives the measured phase's progress: updates, then one end."""

    def update(self, done: int, total: int | None, elapsed_s: float) -> None:
        """Called every `PROGRESS_INTERVAL_S`."""

    def end(self, done: int, total: int | None, elapsed_s: float) -> None:
        """Called once when the phase is over."""


class BenchError(ProxyError):
    """The bench could not run (a child did not start, bad options)."""


def default_body(stream: bool, model: str = DEFAULT_MODEL) -> bytes:
    """A minimal chat completion request."""
    stream_part = ', "stream": true' if stream else ""
    return (
        f'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Say hello."}}]{stream_part}}}'
    ).encode()


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """The load to generate. `requests` is per target; `duration_s` replaces it."""

    base_url: str
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    method: str = "POST"
    body: bytes | None = None
    requests: int = 1000
    concurrency: int = 10
    duration_s: float | None = None
    stream: bool = False
    warmup: int = 0
    timeout_s: float = 30.0
    compare_url: str | None = None
    compare_label: str = "baseline"
    headers: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.warmup < 0:
            raise BenchError("--requests and --concurrency must be >= 1, --warmup >= 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise BenchError("--duration must be > 0 seconds")


@dataclass(slots=True)
class _Target:
    label: str
    base_url: str
    url: URL
    samples: Samples = field(default_factory=Samples)
    watch_limit: bool = False  # read the rate-limit headers of the next answer


class LimitWatch:
    """Reads the token's limit from the first answer; warns if the run exceeds it."""

    def __init__(self, planned: int | None, warn: Warn) -> None:
        self._planned = (
            planned  # requests this run sends to the target (None: a duration)
        )
        self._warn = warn

    def note(self, target: _Target, headers: Mapping[str, str]) -> None:
        """Record the first answer's limit headers (if any) and warn once."""
        target.watch_limit = False
        try:
            limit, remaining = (
                int(headers[LIMIT_HEADER]),
                int(headers[REMAINING_HEADER]),
            )
        except (KeyError, ValueError):
            return
        target.samples.rate_limit = (limit, remaining)
        # This answer's own request is spent already: at most remaining + 1 were left.
        if self._planned is not None and self._planned > remaining:
            self._warn(
                f"the token allows {limit} requests per hour and had "
                f"at most {remaining + 1} left; this run sends {self._planned}, so "
                "expect 429s and a token throttled until its hour has passed (use "
                "fewer --requests or a token with a higher --rate-limit-per-hour)"
            )


class LoadRun:
    """The shared state of one measured phase (no locks: one event loop)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: BenchOptions,
        targets: list[_Target],
        *,
        total: int | None,
        deadline_ns: int | None,
        limit_watch: LimitWatch | None = None,
    ) -> None:
        self._session = session
        self._limit_watch = limit_watch
        self._method = options.method
        self._stream = options.stream
        self._body = options.body
        self._headers = _headers(options)
        self._targets = targets
        self._total = total
        self._deadline_ns = deadline_ns
        self.issued = 0
        self.done = 0

    async def run(self, concurrency: int) -> None:
        """Run `concurrency` workers until the count or the deadline is reached."""
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(self._worker())

    async def _worker(self) -> None:
        targets = self._targets
        count = len(targets)
        clock = time.perf_counter_ns
        while True:
            index = self.issued
            if self._total is not None and index >= self._total:
                return
            if self._deadline_ns is not None and clock() >= self._deadline_ns:
                return
            self.issued = index + 1
            await self.one(targets[index % count])
            self.done += 1

    async def one(self, target: _Target) -> None:
        """One request; its outcome goes into the target's samples."""
        samples = target.samples
        clock = time.perf_counter_ns
        first = last = 0
        started = clock()
        try:
            async with self._session.request(
                self._method, target.url, data=self._body, headers=self._headers
            ) as response:
                status = response.status
                if target.watch_limit and self._limit_watch is not None:
                    self._limit_watch.note(target, response.headers)
                if self._stream and 200 <= status < 300:
                    gaps = samples.chunk_gaps_ns
                    async for _ in response.content.iter_any():
                        now = clock()
                        if first:
                            gaps.append(now - last)
                        else:
                            first = now
                        last = now
                else:
                    await response.read()
                ended = clock()
        except aiohttp.ClientConnectorError:
            samples.errors["connect"] += 1
            return
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError):
            samples.errors["disconnected"] += 1
            return
        except TimeoutError:
            samples.errors["timeout"] += 1
            return
        except aiohttp.ClientError as exc:
            samples.errors[type(exc).__name__] += 1
            return
        samples.statuses[status] += 1
        if 200 <= status < 300:
            samples.ok += 1
            samples.latencies_ns.append(ended - started)
            if first:
                samples.ttfb_ns.append(first - started)
        else:
            samples.failed += 1


def _headers(options: BenchOptions) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(options.headers)
    if options.token:
        headers["Authorization"] = f"Bearer {options.token}"
    if options.body is not None and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    return headers


def _target(label: str, base_url: str, endpoint: str) -> _Target:
    url = URL(base_url.rstrip("/") + "/" + endpoint.lstrip("/"))
    if not url.is_absolute():
        raise BenchError(f"not an absolute URL: {base_url!r}")
    return _Target(label, base_url, url)


def _targets(options: BenchOptions) -> list[_Target]:
    """The measured targets: "target" alone, or "proxy" and the compare label."""
    if not options.compare_url:
        return [_target("target", options.base_url, options.endpoint)]
    return [
        _target("proxy", options.base_url, options.endpoint),
        _target(options.compare_label, options.compare_url, options.endpoint),
    ]


async def run_bench(
    options: BenchOptions,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> BenchReport:
    """Warm up, run the measured phase, and summarise it.

    `warn` hears each warning as it arises (they are in the report as well).
    """
    warnings: list[str] = []

    def note(text: str) -> None:
        warnings.append(text)
        if warn is not None:
            warn(text)

    targets = _targets(options)
    targets[0].watch_limit = True  # the proxy's answers carry the token's limit
    planned = None if options.duration_s else options.requests + options.warmup
    watch = LimitWatch(planned, note)
    connector = aiohttp.TCPConnector(limit=options.concurrency, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=options.timeout_s)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    ) as session:
        if options.warmup:
            await _warm_up(session, options, targets, watch)
        elapsed_s = await _measure(session, options, targets, progress, watch)
    reports = [
        target_report(t.base_url, t.samples, elapsed_s, options.stream, t.label)
        for t in targets
    ]
    named = len(reports) > 1
    warnings.extend(w for r in reports if (w := refusal_warning(r, named)) is not None)
    added = None
    if len(reports) == 2:
        added = added_latency(reports[0].latency, reports[1].latency)
    return BenchReport(
        method=options.method,
        endpoint=options.endpoint,
        concurrency=options.concurrency,
        stream=options.stream,
        elapsed_s=elapsed_s,
        targets=reports,
        added_latency_ms=added,
        warnings=warnings,
    )


async def _warm_up(
    session: aiohttp.ClientSession,
    options: BenchOptions,
    targets: list[_Target],
    watch: LimitWatch,
) -> None:
    """Unmeasured requests first; their samples are dropped, the limit is noted."""
    warm = [_target(t.label, t.base_url, options.endpoint) for t in targets]
    warm[0].watch_limit = True
    total = options.warmup * len(warm)
    await LoadRun(
        session, options, warm, total=total, deadline_ns=None, limit_watch=watch
    ).run(min(options.concurrency, total))
    if warm[0].samples.rate_limit is not None:
        targets[0].samples.rate_limit = warm[0].samples.rate_limit
        targets[0].watch_limit = False


async def _measure(
    session: aiohttp.ClientSession,
    options: BenchOptions,
    targets: list[_Target],
    progress: Progress | None,
    watch: LimitWatch,
) -> float:
    started = time.perf_counter_ns()
    total = None if options.duration_s else options.requests * len(targets)
    deadline = started + int(options.duration_s * 1e9) if options.duration_s else None
    run = LoadRun(
        session, options, targets, total=total, deadline_ns=deadline, limit_watch=watch
    )
    reporter = None
    if progress is not None:
        reporter = asyncio.create_task(_report_progress(run, total, started, progress))
    try:
        await run.run(options.concurrency)
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    elapsed_s = (time.perf_counter_ns() - started) / 1e9
    if progress is not None:
        progress.end(run.done, total, elapsed_s)
    return elapsed_s


async def _report_progress(
    run: LoadRun, total: int | None, started_ns: int, progress: Progress
) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        progress.update(run.done, total, (time.perf_counter_ns() - started_ns) / 1e9)


class ProgressLine:
    """A one-line live progress bar (for a terminal), redrawn in place.

    `message` puts a line of text below the bar (which is redrawn on the next
    update); `end` draws the bar a last time and ends its line, so what is written
    next starts on a line of its own.
    """

    WIDTH: Final = 30

    def __init__(self, duration_s: float | None, write: Callable[[str], None]) -> None:
        self._duration_s = duration_s
        self._write = write
        self._open = False  # a bar is drawn and its line not ended

    def update(self, done: int, total: int | None, elapsed_s: float) -> None:
        """Redraw the bar."""
        if total:
            fraction = done / total
        elif self._duration_s:
            fraction = min(1.0, elapsed_s / self._duration_s)
        else:
            fraction = 0.0
        filled = int(fraction * self.WIDTH)
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        bar = "#" * filled + "." * (self.WIDTH - filled)
        count = f"{done}/{total}" if total else f"{done}"
        self._write(f"\r[{bar}] {count} {rate:.0f} req/s {elapsed_s:.1f} s")
        self._open = True

    def end(self, done: int, total: int | None, elapsed_s: float) -> None:
        """The last drawing, and the end of its line."""
        self.update(done, total, elapsed_s)
        self._write("\n")
        self._open = False

    def message(self, text: str) -> None:
        """A line of text, below the bar when one is drawn."""
        self._write(("\n" if self._open else "") + text + "\n")
        self._open = False


def progress_printer(
    duration_s: float | None, write: Callable[[str], None]
) -> ProgressLine:
    """A live progress bar writing through `write`."""
    return ProgressLine(duration_s, write)


# -- --mock: the fake upstream and a proxy as child processes ------------------------
