"""Typed keys for application and request state. Definitions only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import Settings
from .exchange import Exchange
from .repository import Repository
from .retention import RetentionJob
from .services import ManagementService
from .tokens import Principal, TokenStore, TokenSync

SETTINGS_KEY = web.AppKey("settings", Settings)
REPOSITORY_KEY = web.AppKey("repository", Repository)
SERVICE_KEY = web.AppKey("service", ManagementService)
TOKEN_STORE_KEY = web.AppKey("token_store", TokenStore)
TOKEN_SYNC_KEY = web.AppKey("token_sync", TokenSync)
# Only set when PURGE_INTERVAL schedules purges.
RETENTION_JOB_KEY = web.AppKey("retention_job", RetentionJob)

PRINCIPAL_KEY = web.RequestKey("principal", Principal)

ReadyCheck = Callable[[], Awaitable[str]]
READY_CHECKS_KEY = web.AppKey[dict[str, ReadyCheck]]("ready_checks")

UPSTREAM_SESSION_KEY = web.AppKey("upstream_session", aiohttp.ClientSession)
EXCHANGE_KEY = web.RequestKey("exchange", Exchange)
