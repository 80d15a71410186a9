"""The dashboard and usage pages: counts and usage read from the repository."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from aiohttp import web

from ..storage import TokenFilter, UsageRow
from .render import render, repository, service, state

RECENT: Final = 10
PERIODS: Final[dict[str, tuple[str, timedelta]]] = {
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
    "90d": ("Last 90 days", timedelta(days=90)),
}
DEFAULT_PERIOD: Final = "7d"


@dataclass(frozen=True, slots=True)
class Bar:
    """One row of a server-drawn bar table: a label, its numbers, its length in %."""

    label: str
    key: str
    requests: int
    errors: int
    tokens: int
    percent: float


def bars(rows: list[UsageRow], labels: dict[str, str] | None = None) -> list[Bar]:
    """Rows scaled so the busiest is 100% long."""
    peak = max((row.totals.requests for row in rows), default=0) or 1
    return [
        Bar(
            label=(labels or {}).get(row.key, row.key),
            key=row.key,
            requests=row.totals.requests,
            errors=row.totals.errors,
            tokens=row.totals.total_tokens,
            percent=round(100 * row.totals.requests / peak, 1),
        )
        for row in rows
    ]


def start_of_day(moment: datetime) -> datetime:
    """Midnight UTC of the moment's day."""
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


async def dashboard_page(request: web.Request) -> web.Response:
    """Counts, today's and the week's usage, the latest requests and errors."""
    now = state(request).now()
    repo = repository(request)
    context = {
        "project_count": await repo.count_projects(),
        "active_tokens": await repo.count_tokens(TokenFilter(active=True), now=now),
        "today": await repo.usage_totals(since=start_of_day(now), until=now),
        "week": await repo.usage_totals(since=now - timedelta(days=7), until=now),
        "recent": await repo.recent_usage_events(RECENT),
        "errors": await repo.recent_usage_events(RECENT, errors_only=True),
        "names": await _project_names(request),
    }
    return render(request, "dashboard.html", context)


async def _project_names(request: web.Request) -> dict[str, str]:
    found = await service(request).list_projects(limit=1000, offset=0)
    return {project.id: project.name for project in found.items}


async def usage_page(request: web.Request) -> web.Response:
    """Requests, errors and tokens per day, per project and per token in a period."""
    period = request.query.get("period", DEFAULT_PERIOD)
    period = period if period in PERIODS else DEFAULT_PERIOD
    now = state(request).now()
    since = now - PERIODS[period][1]
    repo = repository(request)
    names = await _project_names(request)
    by_token = await repo.usage_by_token(since=since, until=now)
    by_project = await repo.usage_by_project(since=since, until=now)
    context: dict[str, Any] = {
        "periods": PERIODS,
        "period": period,
        "totals": await repo.usage_totals(since=since, until=now),
        "days": bars(await repo.usage_by_day(since=since, until=now)),
        "projects": bars(by_project, names),
        "tokens": bars(by_token, await _token_labels(request, by_token, names)),
    }
    return render(request, "usage.html", context)


async def _token_labels(
    request: web.Request, rows: list[UsageRow], names: dict[str, str]
) -> dict[str, str]:
    """`…wxyz (project)` for each token still stored."""
    labels = {}
    for row in rows:
        token = await repository(request).get_token(row.key)
        if token is not None:
            project = names.get(token.project_id, "deleted project")
            labels[row.key] = f"…{token.token_hint} ({project})"
    return labels


def add_routes(app: web.Application) -> None:
    """Register the dashboard and usage pages."""
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/usage", usage_page)
