"""Settings: one frozen object built from an injected environment mapping, validated.

Source of truth: built-in defaults, overridden by a `.env` file in the working
directory, overridden by the process environment, overridden by CLI flags
(`Settings.from_env(..., overrides=...)`). Every error names the variable and the bad
value (secret values are never shown).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from yarl import URL

DEFAULT_DATABASE_URL: Final = "sqlite:///./data/llm-proxy.db"
DEFAULT_EVENT_LOG: Final = "./data/events.jsonl"
OFF_WORDS: Final = frozenset({"off", "none", "false", "0", "-"})
MIN_MANAGEMENT_TOKEN_CHARS: Final = 16
MIN_ADMIN_PASSWORD_CHARS: Final = 12
LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "warn", "error", "critical"})
LOG_FORMATS: Final = frozenset({"json", "text"})
EVENT_BUSES: Final = frozenset({"memory", "in-memory", "redis"})
MAX_RETENTION_DAYS: Final = 36_500  # a hundred years: later cut-offs overflow dates

# What fleet limits do while Redis is unreachable: in-process limits, or refuse.
FAILURE_MODES: Final = frozenset({"open", "closed"})


class ConfigError(ValueError):
    """A setting is missing or has a bad value; the message names the setting."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Where and how the proxy talks to the upstream API."""

    base_url: URL
    connect_timeout_s: float = 10.0
    read_idle_timeout_s: float = 600.0
    max_connections: int = 1000
    retries: int = 2
    # Longest wait for a free pooled connection before a fast 503 (the pool is full).
    pool_timeout_s: float = 5.0
    # OPENAI_API_URL was given: it then wins over an allowlist file's `base_url`.
    base_url_set: bool = False
    base_text: str = field(init=False, repr=False)  # base_url as text, no trailing /

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_text", str(self.base_url).rstrip("/"))


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Circuit breaker thresholds for the upstream."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Bounds on client connections: header deadline, connection cap, header size."""

    header_timeout_s: float = 60.0
    # None: derived at start from the process's file-descriptor limit.
    max_connections: int | None = None
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Default caps on calls in flight at once, per token and per project."""

    token_max_concurrent: int = 100
    project_max_concurrent: int = 250


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """How long dead tokens and usage events are kept; how often the purge runs."""

    token_days: int | None = 30  # None: tokens are never purged
    usage_days: int | None = 90  # None: usage events are never purged
    purge_interval_s: float | None = 3600.0  # None: no scheduled purge in `serve`


@dataclass(frozen=True, slots=True)
class FleetLimitSettings:
    """Fleet-wide rate limits and quotas on REDIS_URL: lease size, timeout, failure mode."""

    lease_max: int = 256
    timeout_s: float = 0.25
    fail_closed: bool = False


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class EventSettings:
    """The event bus buffers, usage capture bounds and optional body logging."""

    buffer_size: int = 10_000
    batch_size: int = 100
    flush_interval_s: float = 1.0
    spool_path: Path = Path("./data/event-spool.jsonl")
    log_max_bytes: int = 100 * 1024 * 1024
    log_backups: int = 5
    log_bodies: bool = False
    log_body_max_bytes: int = 64 * 1024
    stream_capture_max_bytes: int = 256 * 1024
    stream_key: str = "llm-proxy:events"
    # Approximate cap on the Redis stream's entries; None never trims.
    stream_maxlen: int | None = 1_000_000
    usage_estimation: bool = True
    # The Redis consumer name of this process; None: `<host>-<pid>`. A worker of a
    # `--workers N` fleet gets a stable one, so its replacement resumes its batches.
    consumer_name: str | None = None


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    """Delivery to logging backends: retries, timeouts, dead letters, credentials."""

    max_retries: int = 5
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    timeout_s: float = 30.0
    drain_timeout_s: float = 10.0
    dead_letter_dir: Path = Path("./data")
    endpoint: str | None = None
    api_key: str | None = field(default=None, repr=False)
    helicone_api_key: str | None = field(default=None, repr=False)
    helicone_url: str | None = None
    lunary_public_key: str | None = field(default=None, repr=False)
    lunary_url: str | None = None
    # Where a standalone `llm-proxy dispatcher` serves /metrics; None: nowhere.
    metrics_addr: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of one proxy process. Build with `Settings.from_env`."""

    management_token: str = field(repr=False)
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    upstream: UpstreamSettings = field(
        default_factory=lambda: UpstreamSettings(URL("https://api.openai.com"))
    )
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    api_config_path: Path | None = None
    encryption_key: bytes | None = field(default=None, repr=False)
    admin_user: str | None = None
    admin_password: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    event_bus: str = "memory"
    log_level: str = "info"
    log_format: str = "json"
    max_request_bytes: int = 50 * 1024 * 1024
    default_rate_limit_per_hour: int = 1000
    token_refresh_interval_s: float = 5.0
    usage_flush_interval_s: float = 1.0
    shutdown_grace_s: float = 30.0
    forward_client_ip: bool = False
    trusted_proxies: tuple[IpNetwork, ...] = ()
    listener: ListenerSettings = field(default_factory=ListenerSettings)
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)
    fleet_limits: FleetLimitSettings = field(default_factory=FleetLimitSettings)
    metrics_token: str | None = field(default=None, repr=False)
    file_event_log: Path | None = None
    db_pool_max_size: int = 10
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    events: EventSettings = field(default_factory=EventSettings)
    dispatcher: DispatcherSettings = field(default_factory=DispatcherSettings)
    # Processes of `serve` (WORKERS, --workers; `auto` = the CPU count).
    workers: int = 1
    # Which worker of a fleet this process is, set by the supervisor (workers.py);
    # None: the only process. Only worker 0 runs the in-process dispatchers.
    worker_index: int | None = None

    @property
    def is_postgres(self) -> bool:
        """True when the database is PostgreSQL (so ENCRYPTION_KEY is required)."""
        return self.database_url.startswith(("postgres://", "postgresql://"))

    @property
    def admin_enabled(self) -> bool:
        """The admin pages are served only when both credentials are set."""
        return bool(self.admin_user and self.admin_password)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        overrides: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from `environ` (default: os.environ) with CLI `overrides`."""
        env = dict(os.environ if environ is None else environ)
        env.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return _parse(_Env(env))


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: KEY=VALUE lines, `#` comments, optional quotes, `export`."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[name.strip()] = _unquote(value.strip())
    return values


def environ_with_dotenv(
    environ: Mapping[str, str], dotenv_path: Path = Path(".env")
) -> dict[str, str]:
    """The environment over the values of a `.env` file (the environment wins)."""
    merged = read_dotenv(dotenv_path) if dotenv_path.is_file() else {}
    merged.update(environ)
    return merged


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value.split(" #", 1)[0].rstrip()


class _Env:
    """Typed readers over the raw mapping; each error names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self._env.get(name, "").strip()
        return value or default

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        return value

    def seconds(self, name: str, default: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw.removesuffix("s"))
        except ValueError:
            raise ConfigError(
                f"{name} must be a number of seconds, got {raw!r}"
            ) from None
        if value <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {raw!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, allowed: frozenset[str]) -> str:
        value = (self.text(name) or default).lower()
        if value not in allowed:
            options = ", ".join(sorted(allowed))
            raise ConfigError(f"{name} must be one of {options}, got {value!r}")
        return value


def _parse(env: _Env) -> Settings:
    host, port = parse_listen_addr(env.text("LISTEN_ADDR", ":8080") or ":8080")
    database_url = _database_url(env.text("DATABASE_URL", DEFAULT_DATABASE_URL))
    settings = Settings(
        management_token=_management_token(env.text("MANAGEMENT_TOKEN")),
        listen_host=host,
        listen_port=port,
        database_url=database_url,
        upstream=_upstream(env),
        breaker=BreakerSettings(
            failure_threshold=env.integer("BREAKER_FAILURE_THRESHOLD", 5, minimum=1),
            cooldown_s=env.seconds("BREAKER_COOLDOWN", 30.0),
        ),
        api_config_path=_optional_path(env.text("API_CONFIG_PATH")),
        encryption_key=parse_encryption_key(env.text("ENCRYPTION_KEY")),
        admin_user=env.text("ADMIN_USER"),
        admin_password=env.text("ADMIN_PASSWORD"),
        redis_url=_redis_url(env.text("REDIS_URL")),
        event_bus=env.choice("LLM_PROXY_EVENT_BUS", "memory", EVENT_BUSES).replace(
            "in-memory", "memory"
        ),
        log_level=_log_level(env.choice("LOG_LEVEL", "info", LOG_LEVELS)),
        log_format=env.choice("LOG_FORMAT", "json", LOG_FORMATS),
        max_request_bytes=env.integer("MAX_REQUEST_BYTES", 50 * 1024 * 1024, minimum=1),
        default_rate_limit_per_hour=env.integer(
            "DEFAULT_RATE_LIMIT_PER_HOUR", 1000, minimum=1
        ),
        token_refresh_interval_s=env.seconds("TOKEN_REFRESH_INTERVAL", 5.0),
        usage_flush_interval_s=env.seconds("USAGE_FLUSH_INTERVAL", 1.0),
        shutdown_grace_s=env.seconds("SHUTDOWN_GRACE_PERIOD", 30.0),
        forward_client_ip=env.boolean("FORWARD_CLIENT_IP", False),
        trusted_proxies=_trusted_proxies(env.text("TRUSTED_PROXIES")),
        listener=_listener(env),
        tenant_limits=TenantLimits(
            token_max_concurrent=env.integer("TOKEN_MAX_CONCURRENT", 100, minimum=1),
            project_max_concurrent=env.integer(
                "PROJECT_MAX_CONCURRENT", 250, minimum=1
            ),
        ),
        fleet_limits=FleetLimitSettings(
            lease_max=env.integer("FLEET_LEASE_MAX", 256, minimum=1),
            timeout_s=env.seconds("REDIS_LIMITS_TIMEOUT", 0.25),
            fail_closed=env.choice("REDIS_FAILURE_MODE", "open", FAILURE_MODES)
            == "closed",
        ),
        metrics_token=env.text("METRICS_TOKEN"),
        file_event_log=_event_log_path(env.text("FILE_EVENT_LOG", DEFAULT_EVENT_LOG)),
        db_pool_max_size=env.integer("DATABASE_POOL_SIZE", 10, minimum=1),
        retention=_retention(env),
        events=_events(env),
        dispatcher=_dispatcher(env),
        workers=_workers(env.text("WORKERS")),
    )
    settings = _fleet_event_bus(settings, env)
    _check_cross_field(settings)
    return settings


def _workers(value: str | None) -> int:
    """WORKERS: a count >= 1, or `auto` for the CPU count."""
    if value is None:
        return 1
    if value.lower() == "auto":
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"WORKERS (--workers) must be a number >= 1 or auto, got {value!r}"
        )
    return int(value)


def _fleet_event_bus(settings: Settings, env: _Env) -> Settings:
    """With several workers the events travel on Redis unless the bus was named.

    One JSONL log and one usage table then get every worker's events through one
    writer (worker 0, see dispatchers_ctx); an explicit `memory` is refused below.
    """
    if settings.workers > 1 and env.text("LLM_PROXY_EVENT_BUS") is None:
        return replace(settings, event_bus="redis")
    return settings


def _check_fleet(settings: Settings) -> None:
    """What `--workers N` (N > 1) needs: state shared through Redis, no per-process
    admin state."""
    if settings.workers == 1:
        return
    given = f"WORKERS={settings.workers} (--workers)"
    if not settings.redis_url:
        raise ConfigError(
            f"{given} needs REDIS_URL: the workers share the event bus (and the "
            "fleet's limits) through Redis; set REDIS_URL=redis://host:6379/0 or "
            "run one worker"
        )
    if settings.event_bus == "memory":
        raise ConfigError(
            f"{given} needs LLM_PROXY_EVENT_BUS=redis (or unset): with an in-memory "
            "bus per worker the JSONL log and the usage table would get one writer "
            "per worker"
        )
    if settings.admin_enabled:
        raise ConfigError(
            f"{given} cannot serve the admin pages yet: their CSRF secret and the "
            "one-time display of a new token live in one process; unset ADMIN_USER "
            "and ADMIN_PASSWORD, or serve them from a one-worker `llm-proxy serve` "
            "on the same database"
        )


def _check_cross_field(settings: Settings) -> None:
    if settings.is_postgres and settings.encryption_key is None:
        raise ConfigError(
            "ENCRYPTION_KEY is required with a PostgreSQL DATABASE_URL "
            "(generate one with: python -c 'import os,base64;"
            "print(base64.b64encode(os.urandom(32)).decode())')"
        )
    if bool(settings.admin_user) != bool(settings.admin_password):
        missing = "ADMIN_PASSWORD" if settings.admin_user else "ADMIN_USER"
        raise ConfigError(f"{missing} must be set too: the admin pages need both")
    password = settings.admin_password
    if password is not None and len(password) < MIN_ADMIN_PASSWORD_CHARS:
        raise ConfigError(
            f"ADMIN_PASSWORD must be at least {MIN_ADMIN_PASSWORD_CHARS} characters, "
            f"got {len(password)}: the admin pages can mint tokens for every project, "
            "and a short password falls to guessing (generate one with: python -c "
            "'import secrets; print(secrets.token_urlsafe(18))')"
        )
    _check_fleet(settings)
    if settings.event_bus == "redis" and not settings.redis_url:
        raise ConfigError("REDIS_URL is required when LLM_PROXY_EVENT_BUS=redis")


def _events(env: _Env) -> EventSettings:
    return EventSettings(
        buffer_size=env.integer("EVENT_BUFFER_SIZE", 10_000, minimum=1),
        batch_size=env.integer("EVENT_BATCH_SIZE", 100, minimum=1),
        flush_interval_s=env.seconds("EVENT_FLUSH_INTERVAL", 1.0),
        spool_path=Path(env.text("EVENT_SPOOL_PATH", "./data/event-spool.jsonl") or ""),
        stream_key=env.text("EVENT_STREAM_KEY", "llm-proxy:events") or "",
        stream_maxlen=env.integer("EVENT_STREAM_MAXLEN", 1_000_000) or None,
        usage_estimation=env.boolean("USAGE_ESTIMATION", True),
        log_max_bytes=env.integer("EVENT_LOG_MAX_BYTES", 100 * 1024 * 1024),
        log_backups=env.integer("EVENT_LOG_BACKUPS", 5),
        log_bodies=env.boolean("LOG_BODIES", False),
        log_body_max_bytes=env.integer("LOG_BODY_MAX_BYTES", 64 * 1024, minimum=1),
        stream_capture_max_bytes=env.integer(
            "STREAM_CAPTURE_MAX_BYTES", 256 * 1024, minimum=1024
        ),
    )


def _retention(env: _Env) -> RetentionSettings:
    interval = env.text("PURGE_INTERVAL")
    off = interval is not None and interval.lower() in OFF_WORDS
    return RetentionSettings(
        token_days=_retention_days(env, "TOKEN_RETENTION_DAYS", 30),
        usage_days=_retention_days(env, "USAGE_RETENTION_DAYS", 90),
        purge_interval_s=None if off else env.seconds("PURGE_INTERVAL", 3600.0),
    )


def _retention_days(env: _Env, name: str, default: int) -> int | None:
    """Whole days from 1 to MAX_RETENTION_DAYS, or 0/off: kept forever (None)."""
    raw = env.text(name)
    if raw is None:
        return default
    if raw.lower() in OFF_WORDS:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_RETENTION_DAYS:
        raise ConfigError(
            f"{name} must be a whole number of days from 1 to {MAX_RETENTION_DAYS}, "
            f"or 0 (or off) to keep forever, got {raw!r}"
        )
    return int(raw)


def _optional_addr(env: _Env, name: str) -> tuple[str, int] | None:
    value = env.text(name)
    return parse_listen_addr(value, name) if value is not None else None


def _http_url(env: _Env, name: str) -> str | None:
    value = env.text(name)
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value


def _dispatcher(env: _Env) -> DispatcherSettings:
    endpoint = _http_url(env, "LOGGING_URL")
    settings = DispatcherSettings(
        max_retries=env.integer("DISPATCHER_MAX_RETRIES", 5),
        retry_base_s=env.seconds("DISPATCHER_RETRY_BASE", 0.5),
        retry_max_s=env.seconds("DISPATCHER_RETRY_MAX", 30.0),
        timeout_s=env.seconds("DISPATCHER_TIMEOUT", 30.0),
        drain_timeout_s=env.seconds("DISPATCHER_DRAIN_TIMEOUT", 10.0),
        dead_letter_dir=Path(env.text("DEAD_LETTER_DIR", "./data") or ""),
        endpoint=endpoint,
        api_key=env.text("DISPATCHER_API_KEY"),
        helicone_api_key=env.text("HELICONE_API_KEY"),
        helicone_url=_http_url(env, "HELICONE_URL"),
        lunary_public_key=env.text("LUNARY_PUBLIC_KEY"),
        lunary_url=_http_url(env, "LUNARY_URL"),
        metrics_addr=_optional_addr(env, "DISPATCHER_METRICS_ADDR"),
    )
    if settings.retry_max_s < settings.retry_base_s:
        raise ConfigError(
            "DISPATCHER_RETRY_MAX must be >= DISPATCHER_RETRY_BASE, got "
            f"{settings.retry_max_s} < {settings.retry_base_s}"
        )
    return settings


def _management_token(value: str | None) -> str:
    if value is None:
        raise ConfigError("MANAGEMENT_TOKEN is required (at least 16 characters)")
    if len(value) < MIN_MANAGEMENT_TOKEN_CHARS:
        raise ConfigError(
            f"MANAGEMENT_TOKEN must be at least {MIN_MANAGEMENT_TOKEN_CHARS} "
            f"characters, got {len(value)}"
        )
    return value


def parse_listen_addr(value: str, name: str = "LISTEN_ADDR") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` → (host, port); no host = all interfaces."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"{name} must look like ':8080' or '127.0.0.1:8080', got {value!r}"
        )
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def _database_url(value: str | None) -> str:
    url = value or DEFAULT_DATABASE_URL
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if url.startswith(("postgres://", "postgresql://")):
        return url
    shown = URL(url).with_password("***") if "@" in url else url
    raise ConfigError(
        "DATABASE_URL must be sqlite:///path/to.db or postgres://user@host/db, "
        f"got {str(shown)!r}"
    )


def _upstream(env: _Env) -> UpstreamSettings:
    raw = env.text("OPENAI_API_URL", "https://api.openai.com") or ""
    url = URL(raw)
    if url.scheme not in {"http", "https"} or not url.host or url.query_string:
        raise ConfigError(
            f"OPENAI_API_URL must be an http(s) URL without a query, got {raw!r}"
        )
    return UpstreamSettings(
        base_url=url.with_path(url.path.rstrip("/")),
        connect_timeout_s=env.seconds("UPSTREAM_CONNECT_TIMEOUT", 10.0),
        read_idle_timeout_s=env.seconds("UPSTREAM_READ_TIMEOUT", 600.0),
        max_connections=env.integer("UPSTREAM_MAX_CONNECTIONS", 1000, minimum=1),
        retries=env.integer("UPSTREAM_RETRIES", 2, minimum=0),
        pool_timeout_s=env.seconds("UPSTREAM_POOL_TIMEOUT", 5.0),
        base_url_set=env.text("OPENAI_API_URL") is not None,
    )


def _listener(env: _Env) -> ListenerSettings:
    raw_cap = env.text("MAX_CLIENT_CONNECTIONS", "auto") or "auto"
    cap = (
        None
        if raw_cap.lower() == "auto"
        else env.integer("MAX_CLIENT_CONNECTIONS", 0, minimum=1)
    )
    return ListenerSettings(
        header_timeout_s=env.seconds("CLIENT_HEADER_TIMEOUT", 60.0),
        max_connections=cap,
        max_header_bytes=env.integer("MAX_HEADER_BYTES", 64 * 1024, minimum=1024),
    )


def _trusted_proxies(value: str | None) -> tuple[IpNetwork, ...]:
    """TRUSTED_PROXIES: comma-separated addresses or CIDR networks."""
    if value is None:
        return ()
    networks: list[IpNetwork] = []
    for item in value.split(","):
        text = item.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(
                "TRUSTED_PROXIES must be comma-separated addresses or networks "
                f"(127.0.0.1, 10.0.0.0/8), got {text!r}"
            ) from None
    return tuple(networks)


def parse_encryption_key(value: str | None) -> bytes | None:
    """ENCRYPTION_KEY is base64 (standard or URL-safe) of exactly 32 bytes."""
    if value is None:
        return None
    padded = value + "=" * (-len(value) % 4)
    key = b""
    for altchars in (None, b"-_"):
        try:
            key = base64.b64decode(padded, altchars=altchars, validate=True)
            break
        except (binascii.Error, ValueError):
            continue
    if len(key) != 32:
        raise ConfigError(
            "ENCRYPTION_KEY must be base64 of 32 random bytes "
            f"(decoded {len(key)} bytes); value not shown"
        )
    return key


def _redis_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"REDIS_URL must start with redis://, rediss:// or unix://, got {value!r}"
        )
    return value


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _log_level(value: str) -> str:
    """`warn` is accepted as a spelling of `warning`."""
    return "warning" if value == "warn" else value


def _event_log_path(value: str | None) -> Path | None:
    """FILE_EVENT_LOG: a path, or `off` for no JSONL event log."""
    if value is None or value.lower() in OFF_WORDS:
        return None
    return Path(value)
