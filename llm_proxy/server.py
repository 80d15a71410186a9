"""Running the app: uvloop, one start log line without secrets, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from . import __version__
from .app import create_app
from .config import Settings

log = logging.getLogger(__name__)


def start_summary(settings: Settings) -> dict[str, Any]:
    """What the start log line says: enough to debug a deployment, no secret."""
    return {
        "version": __version__,
        "listen": f"{settings.listen_host}:{settings.listen_port}",
        "database": "postgresql" if settings.is_postgres else "sqlite",
        "upstream": str(settings.upstream.base_url),
        "event_bus": settings.event_bus,
        "admin": "on"
        if settings.admin_enabled
        else "off (ADMIN_USER/ADMIN_PASSWORD unset)",
        "allowlist": str(settings.api_config_path or "built-in OpenAI defaults"),
    }


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (Linux, macOS), the stdlib loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; in-flight requests get `shutdown_grace_s` to finish."""
    app = create_app(settings)

    async def announce(_: web.Application) -> None:
        log.info("llm-proxy started", extra=start_summary(settings))

    app.on_startup.append(announce)
    web.run_app(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        shutdown_timeout=settings.shutdown_grace_s,
        access_log=None,
        print=None,
        loop=new_event_loop(),
    )
    log.info("llm-proxy stopped")
