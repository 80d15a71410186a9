"""The settings dataclasses: each default of a setting is written here, once."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from yarl import URL

from ..domain_errors import ProxyError
from ..dsn import DatabaseUrl, parse_database_url

# The folder of every file the proxy writes by default, relative to the working
# directory.
DATA_DIR: Final = "./data"
DEFAULT_DATABASE_URL: Final = f"sqlite:///{DATA_DIR}/llm-proxy.db"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ProxyError, ValueError):
    """A setting is missing or has a bad value; the message names the setting."""


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Where and how the proxy talks to the upstream API."""

    base_url: URL = URL("https://api.openai.com")
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
    """How long dead tokens, usage events and audit records are kept; how often the
    purge runs."""

    token_days: int | None = 30  # None: tokens are never purged
    usage_days: int | None = 90  # None: usage events are never purged
    purge_interval_s: float | None = 3600.0  # None: no scheduled purge in `serve`
    audit_days: int | None = 365  # None: audit records are never purged


@dataclass(frozen=True, slots=True)
class FleetLimitSettings:
    """Fleet-wide rate limits and quotas on REDIS_URL: lease size, timeout, failure mode."""

    lease_max: int = 256
    timeout_s: float = 0.25
    fail_closed: bool = False


@dataclass(frozen=True, slots=True)
class EventSettings:
    """The event bus buffers, usage capture bounds and optional body logging."""

    buffer_size: int = 10_000
    batch_size: int = 100
    flush_interval_s: float = 1.0
    spool_path: Path = Path(DATA_DIR, "event-spool.jsonl")
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
    dead_letter_dir: Path = Path(DATA_DIR)
    endpoint: str | None = None
    api_key: str | None = field(default=None, repr=False)
    helicone_api_key: str | None = field(default=None, repr=False)
    helicone_url: str | None = None
    lunary_public_key: str | None = field(default=None, repr=False)
    lunary_url: str | None = None
    # Where a standalone `llm-proxy dispatcher` serves /metrics; None: nowhere.
    metrics_addr: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    """Browsers on /v1: the origins allowed server-wide, how long a preflight is cached.

    A project's own list replaces `allowed_origins` for its tokens (see proxy/cors.py).
    """

    allowed_origins: tuple[str, ...] = ()  # canonical entries (llm_proxy.origins)
    max_age_s: int = 600


@dataclass(frozen=True, slots=True)
class ResponseCacheSettings:
    """The opt-in response cache (RESPONSE_CACHE=on): its Redis, entry life, size."""

    redis_url: str = field(default="", repr=False)
    ttl_max_s: int = 3600
    max_bytes: int = 256 * 1024
    timeout_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of one proxy process. Build with `Settings.from_env`."""

    management_token: str = field(repr=False)
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
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
    # The JSONL event log; None: none.
    file_event_log: Path | None = Path(DATA_DIR, "events.jsonl")
    # A JSONL copy of the audit trail (the database always has it); None: none.
    audit_log_file: Path | None = None
    db_pool_max_size: int = 10
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    events: EventSettings = field(default_factory=EventSettings)
    dispatcher: DispatcherSettings = field(default_factory=DispatcherSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    # Processes of `serve` (WORKERS, --workers; `auto` = the CPU count).
    workers: int = 1
    # Which worker of a fleet this process is, set by the supervisor (workers.py);
    # None: the only process. Only worker 0 runs the in-process dispatchers.
    worker_index: int | None = None
    response_cache: ResponseCacheSettings | None = None  # None: RESPONSE_CACHE off

    @property
    def database(self) -> DatabaseUrl:
        """DATABASE_URL, parsed: its backend and, for SQLite, its file."""
        return parse_database_url(self.database_url)

    @property
    def is_postgres(self) -> bool:
        """True when the database is PostgreSQL (so ENCRYPTION_KEY is required)."""
        return self.database.is_postgres

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
        """Build settings from `environ` (default: os.environ) with CLI `overrides`.

        A secret given as `<NAME>_FILE` is read from that file; an override of a
        secret hides both of its forms in `environ`.
        """
        from .parse import parse_settings  # parse builds this class: imported late
        from .sources import layered, with_secret_files

        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        env = layered(os.environ if environ is None else environ, given)
        return parse_settings(with_secret_files(env))
