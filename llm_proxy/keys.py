"""Typed keys for application and request state. Definitions only.

The value types are imported for the type checker only (each key's annotation names
its type), so importing a key pulls in no service, store or repository: the request
path reads its keys without loading the management or storage layers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from .auth.invalidation import TokenInvalidation
    from .auth.sync import TokenSync
    from .auth.tokens import Principal, TokenStore
    from .config import Settings
    from .management.service import ManagementService
    from .ops.retention import RetentionJob
    from .proxy.cache import ResponseCache
    from .proxy.exchange import Exchange
    from .proxy.fleet_limits import FleetLimiter
    from .storage import Repository

SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings")
REPOSITORY_KEY: web.AppKey[Repository] = web.AppKey("repository")
SERVICE_KEY: web.AppKey[ManagementService] = web.AppKey("service")
TOKEN_STORE_KEY: web.AppKey[TokenStore] = web.AppKey("token_store")
TOKEN_SYNC_KEY: web.AppKey[TokenSync] = web.AppKey("token_sync")
# Only set when PURGE_INTERVAL schedules purges.
RETENTION_JOB_KEY: web.AppKey[RetentionJob] = web.AppKey("retention_job")
TOKEN_INVALIDATION_KEY: web.AppKey[TokenInvalidation] = web.AppKey("token_invalidation")
# Set only when REDIS_URL is: the fleet-wide rate limits and quotas.
FLEET_LIMITER_KEY: web.AppKey[FleetLimiter] = web.AppKey("fleet_limiter")
# Set only when RESPONSE_CACHE is on.
RESPONSE_CACHE_KEY: web.AppKey[ResponseCache] = web.AppKey("response_cache")

PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal")

ReadyCheck = Callable[[], Awaitable[str]]
READY_CHECKS_KEY = web.AppKey[dict[str, ReadyCheck]]("ready_checks")

UPSTREAM_SESSION_KEY = web.AppKey("upstream_session", aiohttp.ClientSession)
EXCHANGE_KEY: web.RequestKey[Exchange] = web.RequestKey("exchange")
