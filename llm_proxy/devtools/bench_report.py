"""Bench results: raw samples per target, percentile summaries, text and JSON reports.

Pure data and arithmetic on client-side `perf_counter_ns` samples; no I/O and no clock.
Percentiles use the nearest-rank method on the sorted samples. Only 2xx answers are
timed and counted in the throughput; other answers and transport errors are counted
apart, so a rate-limited run cannot pass its fast 429s off as latency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

PERCENTILES: Final = (50, 90, 95, 99)
NS_PER_MS: Final = 1_000_000


@dataclass(slots=True)
class Samples:
    """What one target's requests produced (mutated by the load loop only)."""

    latencies_ns: list[int] = field(default_factory=list)
    ttfb_ns: list[int] = field(default_factory=list)
    chunk_gaps_ns: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    failed: int = 0
    # (x-ratelimit-limit-requests, x-ratelimit-remaining-requests) of the first answer
    rate_limit: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency distribution in milliseconds."""

    count: int
    min: float
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class TargetReport:
    """One base URL's outcome; `failed` = `non_2xx` + the transport errors."""

    label: str
    base_url: str
    requests: int
    ok: int
    non_2xx: int
    failed: int
    statuses: dict[str, int]
    errors: dict[str, int]
    throughput_rps: float
    latency: Latency | None
    ttfb: Latency | None = None
    chunk_gap: Latency | None = None
    rate_limit_per_hour: int | None = None
    rate_limit_remaining: int | None = None


@dataclass(frozen=True, slots=True)
class BenchReport:
    """A whole run: the load shape, each target, and the compare difference."""

    method: str
    endpoint: str
    concurrency: int
    stream: bool
    elapsed_s: float
    targets: list[TargetReport]
    added_latency_ms: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able data (`--json`)."""
        return asdict(self)


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(values_ns: Sequence[int]) -> Latency | None:
    """min/mean/p50/p90/p95/p99/max in milliseconds; None without samples."""
    if not values_ns:
        return None
    ordered = sorted(values_ns)
    p = {q: percentile(ordered, q) / NS_PER_MS for q in PERCENTILES}
    return Latency(
        count=len(ordered),
        min=ordered[0] / NS_PER_MS,
        mean=sum(ordered) / len(ordered) / NS_PER_MS,
        p50=p[50],
        p90=p[90],
        p95=p[95],
        p99=p[99],
        max=ordered[-1] / NS_PER_MS,
    )


def target_report(
    base_url: str,
    samples: Samples,
    elapsed_s: float,
    stream: bool,
    label: str = "target",
) -> TargetReport:
    """Summarise one target's samples."""
    done = samples.ok + samples.failed + sum(samples.errors.values())
    limit, remaining = samples.rate_limit or (None, None)
    return TargetReport(
        label=label,
        base_url=base_url,
        requests=done,
        ok=samples.ok,
        non_2xx=samples.failed,
        failed=done - samples.ok,
        statuses={str(k): v for k, v in sorted(samples.statuses.items())},
        errors=dict(sorted(samples.errors.items())),
        throughput_rps=samples.ok / elapsed_s if elapsed_s > 0 else 0.0,
        latency=summarize(samples.latencies_ns),
        ttfb=summarize(samples.ttfb_ns) if stream else None,
        chunk_gap=summarize(samples.chunk_gaps_ns) if stream else None,
        rate_limit_per_hour=limit,
        rate_limit_remaining=remaining,
    )


def refusal_warning(target: TargetReport, named: bool) -> str | None:
    """A note on the answers that were not 2xx, or None when all were.

    `named`: start with the target's label (when the run has more than one).
    """
    if not target.non_2xx:
        return None
    shown = ", ".join(
        f"{k}: {v}" + (" rate limited" if k == "429" else "")
        for k, v in target.statuses.items()
        if not k.startswith("2")
    )
    who = f"{target.label}: " if named else ""
    return (
        f"{who}{target.non_2xx} answers were not 2xx ({shown}); they are counted "
        "apart and left out of the throughput and latency figures"
    )


def added_latency(target: Latency | None, baseline: Latency | None) -> dict[str, float]:
    """Per statistic, how much slower `target` is than `baseline` (ms)."""
    if target is None or baseline is None:
        return {}
    names = ("min", "mean", *(f"p{q}" for q in PERCENTILES), "max")
    return {name: getattr(target, name) - getattr(baseline, name) for name in names}


def render_text(report: BenchReport) -> str:
    """The human report."""
    mode = "streamed" if report.stream else "whole"
    lines = [
        f"{report.method} {report.endpoint}  concurrency {report.concurrency}  "
        f"{mode} responses  {report.elapsed_s:.2f} s",
    ]
    for target in report.targets:
        lines.extend(_render_target(target))
    if report.added_latency_ms is not None:
        lines.append("")
        lines.append(_added_latency_title(report.targets))
        lines.append(
            "  "
            + "  ".join(f"{k} {v:+.3f} ms" for k, v in report.added_latency_ms.items())
        )
    if report.warnings:
        lines.append("")
        lines.extend(f"warning: {text}" for text in report.warnings)
    return "\n".join(lines)


def _added_latency_title(targets: Sequence[TargetReport]) -> str:
    first, second = targets[0], targets[1]
    counts = [t.latency.count if t.latency else 0 for t in (first, second)]
    return (
        f"added latency ({first.label} minus {second.label}, "
        f"{counts[0]} and {counts[1]} samples):"
    )


def _render_target(target: TargetReport) -> list[str]:
    errors = sum(target.errors.values())
    lines = [
        "",
        f"{target.label} {target.base_url}",
        f"  requests    {target.requests}  ok {target.ok}  "
        f"non-2xx {target.non_2xx}  errors {errors}",
        f"  throughput  {target.throughput_rps:.1f} req/s (2xx only)",
    ]
    if target.statuses:
        shown = ", ".join(f"{k}: {v}" for k, v in target.statuses.items())
        lines.append(f"  statuses    {shown}")
    if target.errors:
        shown = ", ".join(f"{k}: {v}" for k, v in target.errors.items())
        lines.append(f"  errors      {shown}")
    if target.rate_limit_per_hour is not None:
        lines.append(
            f"  rate limit  {target.rate_limit_per_hour} per hour, "
            f"{target.rate_limit_remaining} left after the first answer"
        )
    for label, latency in (
        ("total" if target.ttfb is not None else "latency", target.latency),
        ("ttfb", target.ttfb),
        ("chunk gap", target.chunk_gap),
    ):
        if latency is not None:
            lines.append(f"  {label:<11} {_render_latency(latency)}")
    return lines


def _render_latency(latency: Latency) -> str:
    return (
        f"min {latency.min:.3f}  p50 {latency.p50:.3f}  p90 {latency.p90:.3f}  "
        f"p95 {latency.p95:.3f}  p99 {latency.p99:.3f}  max {latency.max:.3f} ms  "
        f"({latency.count} samples, 2xx only)"
    )
