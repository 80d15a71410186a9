"""Where raw settings come from: the environment, a `.env` file, secret files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from dotenv.parser import Binding, parse_stream

from .model import ConfigError

# The settings that hold a secret: each may instead be read from the file that
# `<NAME>_FILE` names (Docker secrets, Kubernetes Secrets mounted as files).
SECRET_SETTINGS: Final = (
    "MANAGEMENT_TOKEN",
    "ENCRYPTION_KEY",
    "ADMIN_PASSWORD",
    "METRICS_TOKEN",
    "DATABASE_URL",
    "REDIS_URL",
    "RESPONSE_CACHE_REDIS_URL",
    "DISPATCHER_API_KEY",
    "HELICONE_API_KEY",
    "LUNARY_PUBLIC_KEY",
)
FILE_SUFFIX: Final = "_FILE"
# A secret file larger than this is refused: no secret is that long, and a path to
# a device (/dev/zero) must not fill the memory.
MAX_SECRET_FILE_BYTES: Final = 64 * 1024


def read_dotenv(path: Path) -> dict[str, str]:
    """The KEY=VALUE pairs of a `.env` file, python-dotenv's syntax without ${VAR}
    expansion; a line that is no assignment fails naming the file and the line."""
    values: dict[str, str] = {}
    # parse_stream, not dotenv_values: that one logs a bad line and goes on.
    with path.open(encoding="utf-8") as stream:
        for binding in parse_stream(stream):
            if binding.error or (binding.key is not None and binding.value is None):
                # The line is not shown: it may hold a secret.
                raise ConfigError(
                    f"{path}:{_first_line(binding)}: expected KEY=VALUE "
                    "(a comment starts with #; the line is not shown)"
                )
            if binding.key is not None and binding.value is not None:
                values[binding.key] = binding.value
    return values


def _first_line(binding: Binding) -> int:
    """The line of a statement's first character (python-dotenv counts from the blank
    lines before it)."""
    text = binding.original.string
    blanks = text[: len(text) - len(text.lstrip())]
    return binding.original.line + blanks.count("\n")


def environ_with_dotenv(
    environ: Mapping[str, str], dotenv_path: Path = Path(".env")
) -> dict[str, str]:
    """The environment over the values of a `.env` file (the environment wins)."""
    dotenv = read_dotenv(dotenv_path) if dotenv_path.is_file() else {}
    return layered(dotenv, environ)


def layered(lower: Mapping[str, str], upper: Mapping[str, str]) -> dict[str, str]:
    """`upper` over `lower`; a secret `upper` sets in either form (NAME or NAME_FILE)
    hides both forms in `lower`."""
    merged = dict(lower)
    for name in SECRET_SETTINGS:
        if name in upper or name + FILE_SUFFIX in upper:
            merged.pop(name, None)
            merged.pop(name + FILE_SUFFIX, None)
    merged.update(upper)
    return merged


def with_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with every secret given as `<NAME>_FILE` read into `<NAME>`."""
    resolved = dict(env)
    for name in SECRET_SETTINGS:
        value = secret_setting(env, name)
        if value is not None:
            resolved[name] = value
    return resolved


def secret_setting(environ: Mapping[str, str], name: str) -> str | None:
    """`name`'s value, or the content of the file `<name>_FILE` names; None if unset.

    Setting both is an error; so is a file that cannot be read or is empty.
    """
    file_setting = name + FILE_SUFFIX
    value = environ.get(name, "").strip()
    path = environ.get(file_setting, "").strip()
    if not path:
        return value or None
    if value:
        raise ConfigError(
            f"{name} and {file_setting} are both set: set one of them "
            "(the file holds the value)"
        )
    return _read_secret_file(file_setting, Path(path))


def _read_secret_file(setting: str, path: Path) -> str:
    """The text of a secret file without its one trailing newline."""
    where = f"{setting}: {str(path)!r}"
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is no UTF-8 text (content not shown)") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise ConfigError(f"{where} is empty")
    return text
