"""Health endpoints: `/health` (who am I), `/live` (the loop runs), `/ready` (deps answer)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from aiohttp import web

from .. import __version__
from ..clock import utc_iso, utc_now
from ..keys import READY_CHECKS_KEY, REPOSITORY_KEY, SETTINGS_KEY
from ..management.api import json_response

READY_CHECK_TIMEOUT_S = 2.0


def _now() -> str:
    return utc_iso(utc_now())


async def health_handler(request: web.Request) -> web.Response:
    """GET /health: status, timestamp and version (and, in a fleet, which worker)."""
    body: dict[str, Any] = {"status": "ok", "timestamp": _now(), "version": __version__}
    settings = request.app.get(SETTINGS_KEY)
    index = None if settings is None else settings.worker_index
    if index is not None:  # `--workers N`: who answered, to see the spread and restarts
        body["worker"] = {"index": index, "pid": os.getpid()}
    return json_response(body)


async def live_handler(request: web.Request) -> web.Response:
    """GET /live: the process answers."""
    return json_response({"status": "alive", "timestamp": _now()})


async def ready_handler(request: web.Request) -> web.Response:
    """GET /ready: 200 when the database answers, 503 naming what fails.

    `status` is `ready`, `degraded` (200: serving, with a part named in `degraded`) or
    `not_ready` (503: the parts named in `failing`).
    """
    checks: dict[str, str] = {}
    started = time.perf_counter()
    try:
        await asyncio.wait_for(
            request.app[REPOSITORY_KEY].ping(), READY_CHECK_TIMEOUT_S
        )
        checks["database"] = "ok"
    except Exception as exc:  # any failure means "not ready"; say which part
        checks["database"] = f"failing: {type(exc).__name__}"
    for name, check in request.app.get(READY_CHECKS_KEY, {}).items():
        checks[name] = await check()
    failing = [name for name, state in checks.items() if state.startswith("failing")]
    degraded = [name for name, state in checks.items() if state.startswith("degraded")]
    status = "not_ready" if failing else "degraded" if degraded else "ready"
    body = {
        "status": status,
        "failing": failing,
        "degraded": degraded,
        "checks": checks,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    return json_response(body, status=503 if failing else 200)
