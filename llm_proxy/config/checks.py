"""Rules between settings, checked once every setting has been read."""

from __future__ import annotations

from typing import Final

from .model import ConfigError, Settings

MIN_ADMIN_PASSWORD_CHARS: Final = 12


def check_cross_field(settings: Settings) -> None:
    """Raise ConfigError when settings that are fine alone do not go together."""
    if settings.is_postgres and settings.encryption_key is None:
        raise ConfigError(
            "ENCRYPTION_KEY is required with a PostgreSQL DATABASE_URL "
            "(generate one with: python -c 'import os,base64;"
            "print(base64.b64encode(os.urandom(32)).decode())')"
        )
    _check_admin(settings)
    _check_fleet(settings)
    if settings.event_bus == "redis" and not settings.redis_url:
        raise ConfigError("REDIS_URL is required when LLM_PROXY_EVENT_BUS=redis")


def _check_admin(settings: Settings) -> None:
    """Both admin credentials or neither, and a password too long to guess."""
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
