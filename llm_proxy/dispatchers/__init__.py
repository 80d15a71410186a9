"""Bus consumers that deliver events: file, Helicone, Lunary, HTTP, usage recorder.

In the proxy process, `dispatchers_ctx` runs the usage recorder (always, so the
admin pages have data), the file dispatcher (when FILE_EVENT_LOG is set) and, on the
memory bus, the http, Helicone and Lunary dispatchers whose settings are given. As a
process of its own, `run_dispatcher` runs one backend on the Redis bus until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from ..accounting.metrics import METRICS_KEY, Metrics
from ..config import ConfigError, Settings
from ..events.lifecycle import EVENT_BUS_KEY
from ..events.memory_bus import InMemoryEventBus
from ..events.model import EventBus, EventT
from ..keys import REPOSITORY_KEY, SETTINGS_KEY
from .base import (
    Backend,
    DeadLetterFile,
    DeliveryError,
    Dispatcher,
    RetryPolicy,
    SendResult,
)
from .file import FileBackend
from .helicone import HeliconeBackend
from .http import HttpBackend, HttpPoster
from .lunary import LunaryBackend
from .records import event_record
from .usage import UsageRecorder

log = logging.getLogger(__name__)

SERVICES: Final = ("file", "helicone", "lunary", "http")
DISPATCHERS_KEY: Final = web.AppKey[list[Dispatcher]]("dispatchers")

__all__ = [
    "DISPATCHERS_KEY",
    "SERVICES",
    "Backend",
    "DeadLetterFile",
    "DeliveryError",
    "Dispatcher",
    "FileBackend",
    "HeliconeBackend",
    "HttpBackend",
    "HttpPoster",
    "LunaryBackend",
    "RetryPolicy",
    "SendResult",
    "UsageRecorder",
    "create_backend",
    "in_process_services",
    "dispatchers_ctx",
    "event_record",
    "run_dispatcher",
    "stop_tasks",
]


def create_backend(
    service: str,
    settings: Settings,
    *,
    endpoint: str | None = None,
    api_key: str | None = None,
) -> Backend:
    """The backend of `service`; flags win over the settings.

    Helicone and Lunary take their own key (HELICONE_API_KEY, LUNARY_PUBLIC_KEY) before
    DISPATCHER_API_KEY, and the http backend only DISPATCHER_API_KEY: one backend's
    credential is never sent to another.
    """
    dispatcher = settings.dispatcher
    api_key = api_key or _service_key(service, settings) or dispatcher.api_key
    if service == "file":
        path = endpoint or settings.file_event_log
        if not path:
            raise ConfigError("the file dispatcher needs --endpoint or FILE_EVENT_LOG")
        events = settings.events
        return FileBackend(
            Path(path), max_bytes=events.log_max_bytes, backups=events.log_backups
        )
    if service == "http":
        url = endpoint or dispatcher.endpoint
        if not url:
            raise ConfigError("the http dispatcher needs --endpoint or LOGGING_URL")
        return HttpBackend(HttpPoster(url, api_key, timeout_s=dispatcher.timeout_s))
    if service in ("helicone", "lunary"):
        if not api_key:
            raise ConfigError(
                f"the {service} dispatcher needs --api-key or DISPATCHER_API_KEY"
            )
        cls = HeliconeBackend if service == "helicone" else LunaryBackend
        url = endpoint or _service_url(service, settings) or _default_endpoint(service)
        return cls(HttpPoster(url, api_key, timeout_s=dispatcher.timeout_s))
    raise ConfigError(f"unknown dispatcher service {service!r}; use one of {SERVICES}")


def _service_key(service: str, settings: Settings) -> str | None:
    if service == "helicone":
        return settings.dispatcher.helicone_api_key
    if service == "lunary":
        return settings.dispatcher.lunary_public_key
    return None


def _service_url(service: str, settings: Settings) -> str | None:
    if service == "helicone":
        return settings.dispatcher.helicone_url
    return settings.dispatcher.lunary_url


def in_process_services(settings: Settings) -> list[str]:
    """The backends the proxy process delivers to itself, besides the usage rows.

    On the Redis bus the http, Helicone and Lunary backends run as `llm-proxy
    dispatcher` processes, one delivery per event for the whole fleet.
    """
    services = ["file"] if settings.file_event_log is not None else []
    if settings.event_bus != "memory":
        return services
    dispatcher = settings.dispatcher
    if dispatcher.endpoint:
        services.append("http")
    if dispatcher.helicone_api_key:
        services.append("helicone")
    if dispatcher.lunary_public_key:
        services.append("lunary")
    return services


def _default_endpoint(service: str) -> str:
    from . import helicone, lunary

    return (
        helicone.DEFAULT_ENDPOINT if service == "helicone" else lunary.DEFAULT_ENDPOINT
    )


def new_dispatcher(
    backend: Backend[EventT],
    bus: EventBus[EventT],
    settings: Settings,
    *,
    group: str,
    metrics: Metrics | None = None,
) -> Dispatcher[EventT]:
    """A dispatcher of `backend` on consumer group `group` of `bus`."""
    dispatcher = settings.dispatcher
    return Dispatcher(
        backend,
        bus.subscribe(group),
        DeadLetterFile(
            dispatcher.dead_letter_dir / f"dead-letter-{backend.name}.jsonl"
        ),
        retry=RetryPolicy(
            dispatcher.max_retries, dispatcher.retry_base_s, dispatcher.retry_max_s
        ),
        metrics=metrics,
        # In memory, an event not delivered at shutdown is gone unless written down;
        # on Redis it stays pending and a later consumer gets it.
        dead_letter_on_cancel=isinstance(bus, InMemoryEventBus),
    )


async def dispatchers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the in-process dispatchers; after the bus closed, wait for their drain.

    Register it before `event_bus_ctx`, so the bus is closed (and its queues
    drained into the dispatchers) before this waits for them.
    """
    settings, bus = app[SETTINGS_KEY], app[EVENT_BUS_KEY]
    metrics = app.get(METRICS_KEY)
    dispatchers = [
        new_dispatcher(
            UsageRecorder(app[REPOSITORY_KEY]),
            bus,
            settings,
            group="usage",
            metrics=metrics,
        )
    ]
    _remind_of_fleet_dispatchers(settings)
    for service in in_process_services(settings):
        backend = create_backend(service, settings)
        dispatchers.append(
            new_dispatcher(backend, bus, settings, group=service, metrics=metrics)
        )
    app[DISPATCHERS_KEY] = dispatchers
    tasks = start_tasks(dispatchers)
    yield
    await stop_tasks(tasks, settings.dispatcher.drain_timeout_s)


def _remind_of_fleet_dispatchers(settings: Settings) -> None:
    """On the Redis bus, backends with settings need their own dispatcher process."""
    if settings.event_bus == "memory":
        return
    dispatcher = settings.dispatcher
    given = {
        "http": dispatcher.endpoint,
        "helicone": dispatcher.helicone_api_key,
        "lunary": dispatcher.lunary_public_key,
    }
    for service, value in given.items():
        if value:
            log.info(
                "event bus is redis: run `llm-proxy dispatcher --service %s` to "
                "deliver to %s",
                service,
                service,
            )


def start_tasks(dispatchers: Sequence[Dispatcher[Any]]) -> list[asyncio.Task[None]]:
    """One task per dispatcher, named after its backend."""
    return [
        asyncio.create_task(d.run(), name=f"dispatcher-{d.name}") for d in dispatchers
    ]


async def stop_tasks(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait up to `timeout_s` for the dispatchers to drain, then cancel them."""
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        log.warning(
            "%s did not drain in %.1fs; stopping it", task.get_name(), timeout_s
        )
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_dispatcher(
    settings: Settings,
    service: str,
    *,
    endpoint: str | None = None,
    api_key: str | None = None,
    batch_size: int | None = None,
    flush_interval_s: float | None = None,
    consumer_name: str | None = None,
    stream_key: str | None = None,
) -> None:
    """`llm-proxy dispatcher`: deliver the Redis bus's events to one backend.

    Reads consumer group `dispatcher-<service>` (so each backend sees every event,
    and several processes of one service share the load), acknowledges a batch only
    after the backend took it (or it was dead-lettered), and on SIGTERM/SIGINT or
    cancellation drains what the stream holds, bounded by the drain timeouts.
    `consumer_name` defaults to `<host>-<pid>`; give a stable one so a restarted
    process picks up its own unacknowledged batch at once instead of after the
    claim timeout.
    """
    if not settings.redis_url:
        raise ConfigError(
            "llm-proxy dispatcher reads the Redis bus: set REDIS_URL "
            "(and LLM_PROXY_EVENT_BUS=redis on the proxies)"
        )
    from ..events.redis_bus import RedisEventBus

    backend = create_backend(service, settings, endpoint=endpoint, api_key=api_key)
    events = settings.events
    bus = RedisEventBus(
        settings.redis_url,
        spool_path=settings.dispatcher.dead_letter_dir
        / f"unused-spool-{service}.jsonl",
        batch_size=batch_size or events.batch_size,
        flush_interval_s=flush_interval_s or events.flush_interval_s,
        consumer_name=consumer_name,
        stream_key=stream_key or events.stream_key,
    )
    metrics = Metrics()
    dispatcher = new_dispatcher(
        backend, bus, settings, group=f"dispatcher-{service}", metrics=metrics
    )
    log.info("dispatcher %s started on %s", service, bus.stream_key)
    task = asyncio.create_task(dispatcher.run(), name=f"dispatcher-{service}")
    stop = asyncio.Event()
    async with _metrics_server(settings, metrics):
        with _signals_set(stop):
            waiter = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                await bus.close()
                await stop_tasks([task], settings.dispatcher.drain_timeout_s)


@contextlib.asynccontextmanager
async def _metrics_server(settings: Settings, metrics: Metrics) -> AsyncIterator[None]:
    """`GET /metrics` of a standalone dispatcher, at DISPATCHER_METRICS_ADDR if set."""
    address = settings.dispatcher.metrics_addr
    if address is None:
        yield
        return
    from ..accounting.metrics import metrics_handler_for

    app = web.Application()
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_handler_for(settings.metrics_token))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, *address).start()
        log.info("dispatcher metrics on http://%s:%d/metrics", *address)
        yield
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM/SIGINT while inside the block (where supported)."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
