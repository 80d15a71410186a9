"""Settings from the raw mapping: each variable read once, its default from the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Final

from ..dsn import parse_redis_url
from ..origins import OriginError, parse_origins
from . import values
from .checks import check_cross_field
from .model import (
    BreakerSettings,
    ConfigError,
    CorsSettings,
    DispatcherSettings,
    EventSettings,
    FleetLimitSettings,
    ListenerSettings,
    ResponseCacheSettings,
    RetentionSettings,
    Settings,
    TenantLimits,
    UpstreamSettings,
)
from .readers import Env

LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "warn", "error", "critical"})
LOG_FORMATS: Final = frozenset({"json", "text"})
EVENT_BUSES: Final = frozenset({"memory", "in-memory", "redis"})
# What fleet limits do while Redis is unreachable: in-process limits, or refuse.
FAILURE_MODES: Final = frozenset({"open", "closed"})
MAX_RETENTION_DAYS: Final = 36_500  # a hundred years: later cut-offs overflow dates

# The defaults of every setting, as the model writes them; its token is never used.
DEFAULT: Final = Settings(management_token="")


def parse_settings(raw: Mapping[str, str]) -> Settings:
    """Every setting from `raw` (secret files already read), checked together."""
    env = Env(raw)
    host, port = _listen_addr(env)
    settings = Settings(
        management_token=values.management_token(env.text("MANAGEMENT_TOKEN")),
        listen_host=host,
        listen_port=port,
        database_url=values.database_url(
            env.text("DATABASE_URL") or DEFAULT.database_url
        ),
        upstream=_upstream(env),
        breaker=_breaker(env),
        api_config_path=env.optional_path("API_CONFIG_PATH", DEFAULT.api_config_path),
        encryption_key=values.parse_encryption_key(env.text("ENCRYPTION_KEY")),
        admin_user=env.text("ADMIN_USER"),
        admin_password=env.text("ADMIN_PASSWORD"),
        redis_url=values.redis_url(env.text("REDIS_URL")),
        event_bus=_event_bus(env),
        log_level=_log_level(env),
        log_format=env.choice("LOG_FORMAT", DEFAULT.log_format, LOG_FORMATS),
        max_request_bytes=env.integer(
            "MAX_REQUEST_BYTES", DEFAULT.max_request_bytes, minimum=1
        ),
        default_rate_limit_per_hour=env.integer(
            "DEFAULT_RATE_LIMIT_PER_HOUR", DEFAULT.default_rate_limit_per_hour, 1
        ),
        token_refresh_interval_s=env.seconds(
            "TOKEN_REFRESH_INTERVAL", DEFAULT.token_refresh_interval_s
        ),
        usage_flush_interval_s=env.seconds(
            "USAGE_FLUSH_INTERVAL", DEFAULT.usage_flush_interval_s
        ),
        shutdown_grace_s=env.seconds("SHUTDOWN_GRACE_PERIOD", DEFAULT.shutdown_grace_s),
        forward_client_ip=env.boolean("FORWARD_CLIENT_IP", DEFAULT.forward_client_ip),
        trusted_proxies=values.trusted_proxies(env.text("TRUSTED_PROXIES")),
        listener=_listener(env),
        tenant_limits=_tenant_limits(env),
        fleet_limits=_fleet_limits(env),
        metrics_token=env.text("METRICS_TOKEN"),
        file_event_log=env.optional_path("FILE_EVENT_LOG", DEFAULT.file_event_log),
        audit_log_file=env.optional_path("AUDIT_LOG_FILE", DEFAULT.audit_log_file),
        db_pool_max_size=env.integer(
            "DATABASE_POOL_SIZE", DEFAULT.db_pool_max_size, minimum=1
        ),
        retention=_retention(env),
        events=_events(env),
        dispatcher=_dispatcher(env),
        cors=_cors(env),
        workers=values.workers(env.text("WORKERS"), DEFAULT.workers),
        response_cache=_response_cache(env),
    )
    settings = _fleet_event_bus(settings, env)
    check_cross_field(settings)
    return settings


def _listen_addr(env: Env) -> tuple[str, int]:
    raw = env.text("LISTEN_ADDR")
    if raw is None:
        return DEFAULT.listen_host, DEFAULT.listen_port
    return values.parse_listen_addr(raw)


def _event_bus(env: Env) -> str:
    """`in-memory` is accepted as a spelling of `memory`."""
    bus = env.choice("LLM_PROXY_EVENT_BUS", DEFAULT.event_bus, EVENT_BUSES)
    return "memory" if bus == "in-memory" else bus


def _log_level(env: Env) -> str:
    """`warn` is accepted as a spelling of `warning`."""
    level = env.choice("LOG_LEVEL", DEFAULT.log_level, LOG_LEVELS)
    return "warning" if level == "warn" else level


def _upstream(env: Env) -> UpstreamSettings:
    default = DEFAULT.upstream
    raw = env.text("OPENAI_API_URL")
    return UpstreamSettings(
        base_url=default.base_url if raw is None else values.upstream_url(raw),
        connect_timeout_s=env.seconds(
            "UPSTREAM_CONNECT_TIMEOUT", default.connect_timeout_s
        ),
        read_idle_timeout_s=env.seconds(
            "UPSTREAM_READ_TIMEOUT", default.read_idle_timeout_s
        ),
        max_connections=env.integer(
            "UPSTREAM_MAX_CONNECTIONS", default.max_connections, minimum=1
        ),
        retries=env.integer("UPSTREAM_RETRIES", default.retries, minimum=0),
        pool_timeout_s=env.seconds("UPSTREAM_POOL_TIMEOUT", default.pool_timeout_s),
        base_url_set=raw is not None,
    )


def _breaker(env: Env) -> BreakerSettings:
    default = DEFAULT.breaker
    return BreakerSettings(
        failure_threshold=env.integer(
            "BREAKER_FAILURE_THRESHOLD", default.failure_threshold, minimum=1
        ),
        cooldown_s=env.seconds("BREAKER_COOLDOWN", default.cooldown_s),
    )


def _listener(env: Env) -> ListenerSettings:
    default = DEFAULT.listener
    return ListenerSettings(
        header_timeout_s=env.seconds("CLIENT_HEADER_TIMEOUT", default.header_timeout_s),
        max_connections=_client_connections(env, default.max_connections),
        max_header_bytes=env.integer(
            "MAX_HEADER_BYTES", default.max_header_bytes, minimum=1024
        ),
    )


def _client_connections(env: Env, default: int | None) -> int | None:
    """MAX_CLIENT_CONNECTIONS: a count, or `auto` (None: derived at start from the
    file-descriptor limit)."""
    raw = env.text("MAX_CLIENT_CONNECTIONS")
    if raw is None:
        return default
    if raw.lower() == "auto":
        return None
    return env.maybe_integer("MAX_CLIENT_CONNECTIONS", minimum=1)


def _tenant_limits(env: Env) -> TenantLimits:
    default = DEFAULT.tenant_limits
    return TenantLimits(
        token_max_concurrent=env.integer(
            "TOKEN_MAX_CONCURRENT", default.token_max_concurrent, minimum=1
        ),
        project_max_concurrent=env.integer(
            "PROJECT_MAX_CONCURRENT", default.project_max_concurrent, minimum=1
        ),
    )


def _fleet_limits(env: Env) -> FleetLimitSettings:
    default = DEFAULT.fleet_limits
    mode = "closed" if default.fail_closed else "open"
    return FleetLimitSettings(
        lease_max=env.integer("FLEET_LEASE_MAX", default.lease_max, minimum=1),
        timeout_s=env.seconds("REDIS_LIMITS_TIMEOUT", default.timeout_s),
        fail_closed=env.choice("REDIS_FAILURE_MODE", mode, FAILURE_MODES) == "closed",
    )


def _events(env: Env) -> EventSettings:
    default = DEFAULT.events
    return EventSettings(
        buffer_size=env.integer("EVENT_BUFFER_SIZE", default.buffer_size, minimum=1),
        batch_size=env.integer("EVENT_BATCH_SIZE", default.batch_size, minimum=1),
        flush_interval_s=env.seconds("EVENT_FLUSH_INTERVAL", default.flush_interval_s),
        spool_path=env.path("EVENT_SPOOL_PATH", default.spool_path),
        stream_key=env.text("EVENT_STREAM_KEY") or default.stream_key,
        # 0 never trims (None).
        stream_maxlen=env.integer("EVENT_STREAM_MAXLEN", default.stream_maxlen or 0)
        or None,
        usage_estimation=env.boolean("USAGE_ESTIMATION", default.usage_estimation),
        log_max_bytes=env.integer("EVENT_LOG_MAX_BYTES", default.log_max_bytes),
        log_backups=env.integer("EVENT_LOG_BACKUPS", default.log_backups),
        log_bodies=env.boolean("LOG_BODIES", default.log_bodies),
        log_body_max_bytes=env.integer(
            "LOG_BODY_MAX_BYTES", default.log_body_max_bytes, minimum=1
        ),
        stream_capture_max_bytes=env.integer(
            "STREAM_CAPTURE_MAX_BYTES", default.stream_capture_max_bytes, minimum=1024
        ),
    )


def _retention(env: Env) -> RetentionSettings:
    default = DEFAULT.retention
    return RetentionSettings(
        token_days=_retention_days(env, "TOKEN_RETENTION_DAYS", default.token_days),
        usage_days=_retention_days(env, "USAGE_RETENTION_DAYS", default.usage_days),
        audit_days=_retention_days(env, "AUDIT_RETENTION_DAYS", default.audit_days),
        purge_interval_s=None
        if env.is_off("PURGE_INTERVAL")
        else env.maybe_seconds("PURGE_INTERVAL") or default.purge_interval_s,
    )


def _retention_days(env: Env, name: str, default: int | None) -> int | None:
    """Whole days from 1 to MAX_RETENTION_DAYS, or 0/off: kept forever (None)."""
    raw = env.text(name)
    if raw is None:
        return default
    if env.is_off(name):
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_RETENTION_DAYS:
        raise ConfigError(
            f"{name} must be a whole number of days from 1 to {MAX_RETENTION_DAYS}, "
            f"or 0 (or off) to keep forever, got {raw!r}"
        )
    return int(raw)


def _dispatcher(env: Env) -> DispatcherSettings:
    default = DEFAULT.dispatcher
    metrics_addr = env.text("DISPATCHER_METRICS_ADDR")
    settings = DispatcherSettings(
        max_retries=env.integer("DISPATCHER_MAX_RETRIES", default.max_retries),
        retry_base_s=env.seconds("DISPATCHER_RETRY_BASE", default.retry_base_s),
        retry_max_s=env.seconds("DISPATCHER_RETRY_MAX", default.retry_max_s),
        timeout_s=env.seconds("DISPATCHER_TIMEOUT", default.timeout_s),
        drain_timeout_s=env.seconds(
            "DISPATCHER_DRAIN_TIMEOUT", default.drain_timeout_s
        ),
        dead_letter_dir=env.path("DEAD_LETTER_DIR", default.dead_letter_dir),
        endpoint=env.http_url("LOGGING_URL"),
        api_key=env.text("DISPATCHER_API_KEY"),
        helicone_api_key=env.text("HELICONE_API_KEY"),
        helicone_url=env.http_url("HELICONE_URL"),
        lunary_public_key=env.text("LUNARY_PUBLIC_KEY"),
        lunary_url=env.http_url("LUNARY_URL"),
        metrics_addr=None
        if metrics_addr is None
        else values.parse_listen_addr(metrics_addr, "DISPATCHER_METRICS_ADDR"),
    )
    if settings.retry_max_s < settings.retry_base_s:
        raise ConfigError(
            "DISPATCHER_RETRY_MAX must be >= DISPATCHER_RETRY_BASE, got "
            f"{settings.retry_max_s} < {settings.retry_base_s}"
        )
    return settings


MAX_CORS_MAX_AGE_S: Final = 86_400  # the longest any browser keeps a preflight


def _cors(env: Env) -> CorsSettings:
    """CORS_ALLOWED_ORIGINS (comma-separated origins) and CORS_MAX_AGE (seconds)."""
    default = DEFAULT.cors
    raw = env.text("CORS_ALLOWED_ORIGINS") or ""
    try:
        origins = parse_origins(item for item in raw.split(",") if item.strip())
    except OriginError as exc:
        raise ConfigError(f"CORS_ALLOWED_ORIGINS: {exc}") from None
    max_age = env.integer("CORS_MAX_AGE", default.max_age_s)
    if max_age > MAX_CORS_MAX_AGE_S:
        raise ConfigError(
            f"CORS_MAX_AGE must be at most {MAX_CORS_MAX_AGE_S} seconds, got {max_age}"
        )
    return CorsSettings(allowed_origins=origins, max_age_s=max_age)


def _fleet_event_bus(settings: Settings, env: Env) -> Settings:
    """With several workers the events travel on Redis unless the bus was named.

    One JSONL log and one usage table then get every worker's events through one
    writer (worker 0, see dispatchers_ctx); an explicit `memory` is refused by the
    checks.
    """
    if settings.workers > 1 and env.text("LLM_PROXY_EVENT_BUS") is None:
        return replace(settings, event_bus="redis")
    return settings


# -- the response cache (RESPONSE_CACHE) --------------------------------------------

# Answers are stored from the relay's JSON capture, which keeps at most this much.
RESPONSE_CACHE_BYTES_LIMIT: Final = 1024 * 1024


def _response_cache(env: Env) -> ResponseCacheSettings | None:
    """RESPONSE_CACHE=on: the cache's settings; its Redis defaults to REDIS_URL."""
    if not env.boolean("RESPONSE_CACHE", False):
        return None
    default = ResponseCacheSettings()
    own = env.text("RESPONSE_CACHE_REDIS_URL")
    url = own or env.text("REDIS_URL")
    if url is None:
        raise ConfigError(
            "RESPONSE_CACHE=on needs REDIS_URL (or RESPONSE_CACHE_REDIS_URL): the "
            "cached answers live in Redis"
        )
    try:
        url = parse_redis_url(url)
    except ValueError as exc:
        name = "RESPONSE_CACHE_REDIS_URL" if own else "REDIS_URL"
        raise ConfigError(str(exc).replace("REDIS_URL", name, 1)) from None
    max_bytes = env.integer("RESPONSE_CACHE_MAX_BYTES", default.max_bytes, minimum=1)
    if max_bytes > RESPONSE_CACHE_BYTES_LIMIT:
        raise ConfigError(
            f"RESPONSE_CACHE_MAX_BYTES must be at most {RESPONSE_CACHE_BYTES_LIMIT} "
            f"(1 MiB, what the relay keeps of an answer), got {max_bytes}"
        )
    return ResponseCacheSettings(
        redis_url=url,
        ttl_max_s=env.integer("RESPONSE_CACHE_TTL_MAX", default.ttl_max_s, minimum=1),
        max_bytes=max_bytes,
        timeout_s=env.seconds("RESPONSE_CACHE_TIMEOUT", default.timeout_s),
    )
