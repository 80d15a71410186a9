"""The audit trail in the app: its bus, its trail, its writers, started and stopped.

The audit bus is a bus of its own, sized like the event bus: in memory, or on Redis
its own stream (`<EVENT_STREAM_KEY>:audit`, spool `<EVENT_SPOOL_PATH stem>.audit`).
Its consumer groups are `audit` (the database) and, with AUDIT_LOG_FILE, `audit-file`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from ..accounting.metrics import METRICS_KEY, Metrics
from ..config import Settings
from ..dispatchers import new_dispatcher, start_tasks, stop_tasks
from ..dispatchers.base import Dispatcher
from ..events.audit import AuditRecorded
from ..events.lifecycle import create_bus
from ..events.model import EventBus
from ..keys import REPOSITORY_KEY, SETTINGS_KEY
from .file import AuditFileBackend
from .metrics import AuditCollector
from .publisher import BusAuditTrail
from .recorder import AuditRecorder
from .trail import AUDIT_TRAIL_KEY

AUDIT_BUS_KEY: Final = web.AppKey[EventBus[AuditRecorded]]("audit_bus")
STREAM_SUFFIX: Final = ":audit"


def create_audit_bus(settings: Settings) -> EventBus[AuditRecorded]:
    """The audit bus of these settings; nothing connects until `start()`."""
    events = settings.events
    spool = events.spool_path
    return create_bus(
        settings,
        AuditRecorded,
        events.stream_key + STREAM_SUFFIX,
        spool.with_name(f"{spool.stem}.audit{spool.suffix}"),
    )


def install_audit(app: web.Application, settings: Settings, metrics: Metrics) -> None:
    """Put the audit bus and trail on `app`, their metrics on `metrics`.

    `audit_ctx` (in the app's cleanup contexts, after the repository's) runs them.
    """
    bus = app[AUDIT_BUS_KEY] = create_audit_bus(settings)
    trail = BusAuditTrail(bus, settings.trusted_proxies)
    app[AUDIT_TRAIL_KEY] = trail
    metrics.registry.register(AuditCollector(trail))


async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the audit bus and its writers; on shutdown close the bus (its writers
    drain what it holds), then wait for them."""
    settings, bus = app[SETTINGS_KEY], app[AUDIT_BUS_KEY]
    await bus.start()
    tasks = start_tasks(_writers(app, settings, bus))
    try:
        yield
    finally:
        await bus.close()
        await stop_tasks(tasks, settings.dispatcher.drain_timeout_s)


def _writers(
    app: web.Application, settings: Settings, bus: EventBus[AuditRecorded]
) -> list[Dispatcher[AuditRecorded]]:
    metrics = app.get(METRICS_KEY)
    writers = [
        new_dispatcher(
            AuditRecorder(app[REPOSITORY_KEY]),
            bus,
            settings,
            group="audit",
            metrics=metrics,
        )
    ]
    if settings.audit_log_file is not None:
        events = settings.events
        backend = AuditFileBackend(
            settings.audit_log_file,
            max_bytes=events.log_max_bytes,
            backups=events.log_backups,
        )
        writers.append(
            new_dispatcher(backend, bus, settings, group="audit-file", metrics=metrics)
        )
    return writers
