"""The bus the settings name, its app key, and its start/close around the app's life."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import web

from ..config import Settings
from .memory_bus import InMemoryEventBus
from .model import EventBus, EventT, RequestCompleted

EVENT_BUS_KEY: Final = web.AppKey("event_bus", EventBus)


def create_event_bus(settings: Settings) -> EventBus:
    """The bus LLM_PROXY_EVENT_BUS names; nothing connects until `start()`."""
    events = settings.events
    return create_bus(settings, RequestCompleted, events.stream_key, events.spool_path)


def create_bus(
    settings: Settings, event_type: type[EventT], stream_key: str, spool_path: Path
) -> EventBus[EventT]:
    """A bus of `event_type` of the kind LLM_PROXY_EVENT_BUS names, sized by the event
    settings; on Redis its stream is `stream_key` and its spool `spool_path`."""
    events = settings.events
    if settings.event_bus == "redis" and settings.redis_url:
        from .redis_bus import RedisEventBus  # redis only when it is used

        return RedisEventBus(
            settings.redis_url,
            spool_path=spool_path,
            buffer_size=events.buffer_size,
            batch_size=events.batch_size,
            flush_interval_s=events.flush_interval_s,
            stream_key=stream_key,
            maxlen=events.stream_maxlen,
            consumer_name=events.consumer_name,
            event_type=event_type,
        )
    return InMemoryEventBus[EventT](
        buffer_size=events.buffer_size,
        batch_size=events.batch_size,
        flush_interval_s=events.flush_interval_s,
    )


async def event_bus_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the bus; on shutdown close it, which lets subscribers drain."""
    bus = app[EVENT_BUS_KEY]
    await bus.start()
    yield
    await bus.close()
