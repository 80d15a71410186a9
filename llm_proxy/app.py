"""`create_app(settings)`: builds the service objects, mounts sub-apps, wires lifecycles."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from .accounting.cache_metrics import ResponseCacheCollector
from .accounting.fleet_metrics import FleetLimitsCollector
from .accounting.instrumentation import (
    INSTRUMENTATION_KEY,
    Instrumentation,
    instrumentation_ctx,
)
from .accounting.metrics import METRICS_KEY, Metrics, metrics_handler_for
from .audit.lifecycle import audit_ctx, install_audit
from .auth.crypto import KeyCipher, TokenHasher, load_or_create_key_file
from .auth.invalidation import TokenInvalidation
from .auth.sync import TokenSync
from .auth.tokens import TokenStore
from .config import Settings
from .dispatchers import dispatchers_ctx
from .errors import json_errors_middleware
from .events.lifecycle import EVENT_BUS_KEY, create_event_bus, event_bus_ctx
from .keys import (
    FLEET_LIMITER_KEY,
    READY_CHECKS_KEY,
    REPOSITORY_KEY,
    RESPONSE_CACHE_KEY,
    RETENTION_JOB_KEY,
    SERVICE_KEY,
    SETTINGS_KEY,
    TOKEN_INVALIDATION_KEY,
    TOKEN_STORE_KEY,
    TOKEN_SYNC_KEY,
)
from .management.api import create_management_app
from .management.service import ManagementService, check_encryption_key
from .ops.health import health_handler, live_handler, ready_handler
from .ops.readiness import breaker_check
from .ops.retention import Purger, RetentionJob
from .proxy.allowlist import Allowlist, default_allowlist
from .proxy.allowlist_file import load_allowlist
from .proxy.breaker import BreakerState, CircuitBreaker
from .proxy.chain import (
    AllowlistStage,
    CircuitBreakerStage,
    ConcurrencyStage,
    RateLimitStage,
    Stage,
    TokenAuthStage,
    proxy_chain,
)
from .proxy.concurrency import InFlight
from .proxy.cors import CorsPolicy, preflight_handler
from .proxy.ratelimit import GcraLimiter
from .proxy.relay import proxy_handler
from .proxy.upstream import upstream_session_ctx
from .storage import create_repository

if TYPE_CHECKING:
    from .proxy.cache import ResponseCache
    from .proxy.fleet_limits import FleetLimiter

log = logging.getLogger(__name__)


def master_key(settings: Settings) -> bytes:
    """ENCRYPTION_KEY, or (SQLite only) a key file generated next to the database."""
    if settings.encryption_key is not None:
        return settings.encryption_key
    db_file = settings.database.sqlite_path
    assert db_file is not None  # PostgreSQL needs ENCRYPTION_KEY (config checks it)
    return load_or_create_key_file(db_file.with_name(db_file.name + ".key"))


def create_app(settings: Settings) -> web.Application:
    """The whole proxy application; connections open in its cleanup contexts."""
    settings = with_allowlist_upstream(settings)
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
    sync = app[TOKEN_SYNC_KEY] = TokenSync(
        store,
        repository,
        reload_interval_s=settings.token_refresh_interval_s,
        flush_interval_s=settings.usage_flush_interval_s,
    )
    invalidation = (
        TokenInvalidation(settings.redis_url, sync.poke) if settings.redis_url else None
    )
    app[SERVICE_KEY] = ManagementService(
        repository,
        KeyCipher(key),
        TokenHasher(key),
        store,
        on_change=invalidation.publish if invalidation else None,
    )
    breaker = new_breaker(settings)
    app[READY_CHECKS_KEY] = {"upstream_breaker": breaker_check(breaker)}
    metrics = app[METRICS_KEY] = Metrics()
    metrics.live.breaker = breaker
    install_audit(app, settings, metrics)
    fleet = None
    if settings.redis_url:
        fleet = app[FLEET_LIMITER_KEY] = new_fleet_limiter(settings, store)
        # Redis away is "degraded", not "failing": limits fall back to the process
        # and the event bus to its spool, so the instance keeps serving.
        app[READY_CHECKS_KEY]["redis"] = fleet.readiness
        metrics.registry.register(FleetLimitsCollector(lambda: fleet.stats))
    cache = new_response_cache(settings)
    if cache is not None:
        app[RESPONSE_CACHE_KEY] = cache
        metrics.registry.register(ResponseCacheCollector(lambda: cache.stats))
    if invalidation is not None:
        app[TOKEN_INVALIDATION_KEY] = invalidation
        app[READY_CHECKS_KEY]["token_invalidation"] = invalidation.ready_check
        metrics.live.invalidation = invalidation.stats
    retention = settings.retention
    if retention.purge_interval_s is not None:
        app[RETENTION_JOB_KEY] = RetentionJob(
            Purger(repository, retention), retention.purge_interval_s, metrics=metrics
        )
    bus = app[EVENT_BUS_KEY] = create_event_bus(settings)
    instrumentation = Instrumentation(bus, settings.events, metrics)
    app[INSTRUMENTATION_KEY] = instrumentation
    # Teardown runs in reverse: the upstream session closes, the instrumentation
    # drains into the bus, the bus closes (its subscribers drain), the dispatchers
    # finish, the audit bus closes and its writers drain, then the repository closes.
    app.cleanup_ctx.extend(
        [
            repository_ctx,
            audit_ctx,
            token_sync_ctx,
            retention_ctx,
            token_invalidation_ctx,
            fleet_limits_ctx,
            response_cache_ctx,
            dispatchers_ctx,
            event_bus_ctx,
            instrumentation_ctx,
            upstream_session_ctx,
        ]
    )
    app.router.add_get("/metrics", metrics_handler_for(settings.metrics_token))
    app.router.add_get("/health", health_handler)
    app.router.add_get("/live", live_handler)
    app.router.add_get("/ready", ready_handler)
    app.add_subapp("/manage", create_management_app(settings.management_token))
    cors = CorsPolicy(settings.cors, store.origin_index)
    allowlist = load_endpoint_allowlist(settings)
    proxy = create_proxy_handler(
        settings, store, breaker, instrumentation, cors, allowlist, fleet, cache
    )
    preflight = preflight_handler(cors, allowlist, proxy)
    # Preflights carry no token: answered before the chain (other methods never
    # look at this route: the router picks a route by one dict lookup on the method).
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", preflight)
    app.router.add_route("*", "/v1/{tail:.*}", proxy)
    mount_admin(app, settings)
    return app


def load_endpoint_allowlist(settings: Settings) -> Allowlist:
    """The YAML allowlist from API_CONFIG_PATH, or the built-in OpenAI one."""
    if settings.api_config_path is None:
        return default_allowlist()
    return load_allowlist(settings.api_config_path)


def with_allowlist_upstream(settings: Settings) -> Settings:
    """The settings with the allowlist file's `base_url` as the upstream, unless
    OPENAI_API_URL was set (the environment wins over the file)."""
    if settings.api_config_path is None or settings.upstream.base_url_set:
        return settings
    base_url = load_endpoint_allowlist(settings).upstream_base_url
    if base_url is None:
        return settings
    url = URL(base_url)
    upstream = dataclasses.replace(
        settings.upstream, base_url=url.with_path(url.path.rstrip("/"))
    )
    return dataclasses.replace(settings, upstream=upstream)


def create_proxy_handler(
    settings: Settings,
    store: TokenStore,
    breaker: CircuitBreaker,
    instrumentation: Instrumentation,
    cors: CorsPolicy,
    allowlist: Allowlist,
    fleet: FleetLimiter | None = None,
    cache: ResponseCache | None = None,
) -> Handler:
    """The /v1 handler: the proxy chain composed by hand, outermost first.

    Not a sub-app with middlewares: aiohttp wraps each sub-app middleware in a
    per-request context manager and resolves the sub-app prefix before its own
    router (~10% of the proxy's time, profiled under load), and nested middleware
    coroutines cost a frame on every resume of the relay loop.
    With `fleet` (REDIS_URL) the rate limit and the lifetime cap hold fleet-wide;
    with `cache` (RESPONSE_CACHE=on) the response cache's stage comes last, so it
    plans only calls every other stage admitted.
    """
    default_rate = settings.default_rate_limit_per_hour
    rate_stage: Stage = RateLimitStage(GcraLimiter(), default_rate)
    if fleet is not None:
        from .proxy.fleet_stage import FleetLimitStage  # redis only when configured

        rate_stage = FleetLimitStage(fleet, GcraLimiter(), default_rate)
    stages: list[Stage] = [
        AllowlistStage(allowlist),
        TokenAuthStage(store, cors),
        rate_stage,
        ConcurrencyStage(
            InFlight(),
            settings.tenant_limits.token_max_concurrent,
            settings.tenant_limits.project_max_concurrent,
        ),
        CircuitBreakerStage(breaker),
    ]
    if cache is not None:
        from .proxy.cache_stage import ResponseCacheStage  # redis only when configured

        stages.append(ResponseCacheStage(cache))
    return proxy_chain(instrumentation, stages, proxy_handler, cors)


def new_fleet_limiter(settings: Settings, store: TokenStore) -> FleetLimiter:
    """The fleet-wide limits on REDIS_URL; nothing connects until `start()`."""
    from .proxy.fleet_limits import FleetLimiter  # redis only when configured

    assert settings.redis_url is not None
    limits = settings.fleet_limits
    return FleetLimiter(
        settings.redis_url,
        store.quota_basis,
        lease_max=limits.lease_max,
        timeout_s=limits.timeout_s,
        fail_closed=limits.fail_closed,
    )


async def fleet_limits_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the lease script; on shutdown give unused leases back to the fleet."""
    fleet = app.get(FLEET_LIMITER_KEY)
    if fleet is None:
        yield
        return
    await fleet.start()
    yield
    await fleet.close()


def new_response_cache(settings: Settings) -> ResponseCache | None:
    """The response cache on its Redis (RESPONSE_CACHE=on); nothing connects yet."""
    options = settings.response_cache
    if options is None:
        return None
    from redis.asyncio import Redis  # redis only when configured
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from .proxy.cache import ResponseCache

    redis = Redis.from_url(
        options.redis_url,
        socket_timeout=options.timeout_s,
        socket_connect_timeout=options.timeout_s,
        # a pooled connection Redis closed is retried once; a dead Redis is skipped
        retry=Retry(NoBackoff(), 1),
    )
    return ResponseCache(
        redis,
        ttl_max_s=options.ttl_max_s,
        max_bytes=options.max_bytes,
        timeout_s=options.timeout_s,
    )


async def response_cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the cache's writer; on shutdown write what is queued and disconnect."""
    cache = app.get(RESPONSE_CACHE_KEY)
    if cache is not None:
        cache.start()
    yield
    if cache is not None:
        await cache.close()


def new_breaker(settings: Settings) -> CircuitBreaker:
    """The upstream's circuit breaker; each state change is logged."""

    def log_change(old: BreakerState, new: BreakerState) -> None:
        log.warning("upstream circuit breaker %s -> %s", old.value, new.value)

    return CircuitBreaker(
        settings.breaker.failure_threshold,
        settings.breaker.cooldown_s,
        on_change=log_change,
    )


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


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the scheduled retention purge (when PURGE_INTERVAL is not off)."""
    job = app.get(RETENTION_JOB_KEY)
    if job is None:
        yield
        return
    job.start()
    yield
    await job.close()


async def token_invalidation_ctx(app: web.Application) -> AsyncIterator[None]:
    """With REDIS_URL: listen for other processes' changes (after the warm reload)."""
    invalidation = app.get(TOKEN_INVALIDATION_KEY)
    if invalidation is None:
        yield
        return
    await invalidation.start()
    yield
    await invalidation.close()


def mount_admin(app: web.Application, settings: Settings) -> None:
    """The admin pages under /admin/, only when ADMIN_USER and ADMIN_PASSWORD are set."""
    if settings.admin_enabled:
        from .admin import create_admin_app  # jinja2 only when the pages are on

        app.add_subapp("/admin", create_admin_app(settings))
    else:
        log.info("admin pages off: set ADMIN_USER and ADMIN_PASSWORD to enable them")
