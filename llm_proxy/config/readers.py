"""Typed readers over the raw settings mapping; each error names the variable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .model import ConfigError

# Values that turn an optional feature off (FILE_EVENT_LOG, PURGE_INTERVAL, ...).
OFF_WORDS: Final = frozenset({"off", "none", "false", "0", "-"})
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


class Env:
    """The raw settings, read as typed values; an unset or empty one is its default."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        """The value without surrounding blanks; `default` when unset or empty."""
        value = self._env.get(name, "").strip()
        return value or default

    def is_off(self, name: str) -> bool:
        """The value is one of OFF_WORDS."""
        value = self.text(name)
        return value is not None and value.lower() in OFF_WORDS

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        """A whole number >= `minimum`."""
        value = self.maybe_integer(name, minimum)
        return default if value is None else value

    def maybe_integer(self, name: str, minimum: int = 0) -> int | None:
        """A whole number >= `minimum`, or None when unset."""
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        return value

    def seconds(self, name: str, default: float) -> float:
        """A number of seconds > 0 (an `s` suffix is allowed)."""
        value = self.maybe_seconds(name)
        return default if value is None else value

    def maybe_seconds(self, name: str) -> float | None:
        """A number of seconds > 0, or None when unset."""
        raw = self.text(name)
        if raw is None:
            return None
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
        """true/false, yes/no, on/off or 1/0."""
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, allowed: frozenset[str]) -> str:
        """One of `allowed`, in lower case."""
        value = (self.text(name) or default).lower()
        if value not in allowed:
            options = ", ".join(sorted(allowed))
            raise ConfigError(f"{name} must be one of {options}, got {value!r}")
        return value

    def path(self, name: str, default: Path) -> Path:
        """A file or folder path."""
        value = self.text(name)
        return default if value is None else Path(value)

    def optional_path(self, name: str, default: Path | None) -> Path | None:
        """A path, or one of OFF_WORDS for none."""
        if self.is_off(name):
            return None
        value = self.text(name)
        return default if value is None else Path(value)

    def http_url(self, name: str) -> str | None:
        """An http(s) URL, or None when unset."""
        value = self.text(name)
        if value is not None and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
        return value
