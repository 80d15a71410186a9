"""`create_app(settings)`: builds the service objects, mounts sub-apps, wires lifecycles."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from .config import Settings
from .crypto import KeyCipher, TokenHasher, load_or_create_key_file
from .health import health_handler, live_handler, ready_handler
from .keys import (
    READY_CHECKS_KEY,
    REPOSITORY_KEY,
    SERVICE_KEY,
    SETTINGS_KEY,
    TOKEN_STORE_KEY,
    TOKEN_SYNC_KEY,
)
from .manage import create_management_app
from .middlewares import json_errors_middleware
from .repository import create_repository
from .services import ManagementService, check_encryption_key
from .tokens import TokenStore, TokenSync

log = logging.getLogger(__name__)


def sqlite_path(database_url: str) -> Path:
    """The file of a `sqlite:///path` URL (relative to the working directory)."""
    return Path(database_url.removeprefix("sqlite:///"))


def master_key(settings: Settings) -> bytes:
    """ENCRYPTION_KEY, or (SQLite only) a key file generated next to the database."""
    if settings.encryption_key is not None:
        return settings.encryption_key
    db_file = sqlite_path(settings.database_url)
    return load_or_create_key_file(db_file.with_name(db_file.name + ".key"))


def create_app(settings: Settings) -> web.Application:
    """The whole proxy application; connections open in its cleanup contexts."""
    key = master_key(settings)
    repository = create_repository(
        settings.database_url, pool_max_size=settings.db_pool_max_size
    )
    store = TokenStore(TokenHasher(key), KeyCipher(key))
    app = web.Application(
        middlewares=[json_errors_middleware()],
        client_max_size=settings.max_request_bytes,
    )
    app[SETTINGS_KEY] = settings
    app[REPOSITORY_KEY] = repository
    app[TOKEN_STORE_KEY] = store
    app[SERVICE_KEY] = ManagementService(repository, KeyCipher(key), TokenHasher(key), store)
    app[TOKEN_SYNC_KEY] = TokenSync(
        store,
        repository,
        reload_interval_s=settings.token_refresh_interval_s,
        flush_interval_s=settings.usage_flush_interval_s,
    )
    app[READY_CHECKS_KEY] = {}
    app.cleanup_ctx.extend([repository_ctx, token_sync_ctx])
    app.router.add_get("/health", health_handler)
    app.router.add_get("/live", live_handler)
    app.router.add_get("/ready", ready_handler)
    app.add_subapp("/manage", create_management_app(settings.management_token))
    return app


async def repository_ctx(app: web.Application) -> AsyncIterator[None]:
    """Connect, migrate and check the encryption key; close on shutdown."""
    repository = app[REPOSITORY_KEY]
    await repository.connect()
    try:
        applied = await repository.migrate()
        if applied:
            log.info("applied database migrations %s", applied)
        await check_encryption_key(repository, app[SERVICE_KEY].cipher)
        yield
    finally:
        await repository.close()


async def token_sync_ctx(app: web.Application) -> AsyncIterator[None]:
    """Warm the token snapshot; keep it fresh; flush usage counts on shutdown."""
    sync = app[TOKEN_SYNC_KEY]
    await sync.start()
    yield
    await sync.close()
