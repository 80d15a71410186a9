"""Settings: one frozen object built from the environment, `.env` and secret files.

Source of truth: the defaults of `model`, overridden by a `.env` file in the working
directory, overridden by the process environment, overridden by CLI flags
(`Settings.from_env(..., overrides=...)`). A secret setting may name a file instead
(`<NAME>_FILE`). Every error names the variable and the bad value (secret values are
never shown).
"""

from __future__ import annotations

from .model import (
    DEFAULT_DATABASE_URL,
    BreakerSettings,
    ConfigError,
    CorsSettings,
    DispatcherSettings,
    EventSettings,
    FleetLimitSettings,
    IpNetwork,
    ListenerSettings,
    ResponseCacheSettings,
    RetentionSettings,
    Settings,
    TenantLimits,
    UpstreamSettings,
)
from .sources import (
    SECRET_SETTINGS,
    environ_with_dotenv,
    read_dotenv,
    secret_setting,
)
from .values import parse_encryption_key, parse_listen_addr

__all__ = [
    "DEFAULT_DATABASE_URL",
    "SECRET_SETTINGS",
    "BreakerSettings",
    "ConfigError",
    "CorsSettings",
    "DispatcherSettings",
    "EventSettings",
    "FleetLimitSettings",
    "IpNetwork",
    "ListenerSettings",
    "ResponseCacheSettings",
    "RetentionSettings",
    "Settings",
    "TenantLimits",
    "UpstreamSettings",
    "environ_with_dotenv",
    "parse_encryption_key",
    "parse_listen_addr",
    "read_dotenv",
    "secret_setting",
]
