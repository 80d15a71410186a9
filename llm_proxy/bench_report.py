"""Bench results: raw samples per target, percentile summaries, text and JSON reports.

Pure data and arithmetic on client-side `perf_counter_ns` samples; no I/O and no clock.
Percentiles use the nearest-rank method on the sorted samples.
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
    """One base URL's outcome."""

    base_url: str
    requests: int
    ok: int
    failed: int
    statuses: dict[str, int]
    errors: dict[str, int]
    throughput_rps: float
    latency: Latency | None
    ttfb: Latency | None = None
    chunk_gap: Latency | None = None


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
    base_url: str, samples: Samples, elapsed_s: float, stream: bool
) -> TargetReport:
    """Summarise one target's samples."""
    done = samples.ok + samples.failed + sum(samples.errors.values())
    return TargetReport(
        base_url=base_url,
        requests=done,
        ok=samples.ok,
        failed=done - samples.ok,
        statuses={str(k): v for k, v in sorted(samples.statuses.items())},
        errors=dict(sorted(samples.errors.items())),
        throughput_rps=samples.ok / elapsed_s if elapsed_s > 0 else 0.0,
        latency=summarize(samples.latencies_ns),
        ttfb=summarize(samples.ttfb_ns) if stream else None,
        chunk_gap=summarize(samples.chunk_gaps_ns) if stream else None,
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
        lines.append("added latency (first target minus compare target):")
        lines.append(
            "  "
            + "  ".join(f"{k} {v:+.3f} ms" for k, v in report.added_latency_ms.items())
        )
    return "\n".join(lines)


def _render_target(target: TargetReport) -> list[str]:
    lines = [
        "",
        f"target {target.base_url}",
        f"  requests    {target.requests}  ok {target.ok}  failed {target.failed}",
        f"  throughput  {target.throughput_rps:.1f} req/s",
    ]
    if target.statuses:
        shown = ", ".join(f"{k}: {v}" for k, v in target.statuses.items())
        lines.append(f"  statuses    {shown}")
    if target.errors:
        shown = ", ".join(f"{k}: {v}" for k, v in target.errors.items())
        lines.append(f"  errors      {shown}")
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
        f"p95 {latency.p95:.3f}  p99 {latency.p99:.3f}  max {latency.max:.3f} ms"
    )
