"""`*_FILE` settings: a secret read from a file (Docker secrets, mounted Secrets)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.config import (
    SECRET_SETTINGS,
    ConfigError,
    Settings,
    environ_with_dotenv,
    secret_setting,
)

TOKEN = "0123456789abcdef"
KEY_BYTES = bytes(range(32))
KEY = base64.b64encode(KEY_BYTES).decode()
PASSWORD = "a-long-admin-password"

# Each secret setting: a valid value, what Settings holds for it, what it needs too.
CASES: dict[str, tuple[str, Any, Callable[[Settings], Any], dict[str, str]]] = {
    "MANAGEMENT_TOKEN": (
        "file-token-0123456789",
        None,
        lambda s: s.management_token,
        {},
    ),
    "ENCRYPTION_KEY": (KEY, KEY_BYTES, lambda s: s.encryption_key, {}),
    "ADMIN_PASSWORD": (PASSWORD, None, lambda s: s.admin_password, {"ADMIN_USER": "a"}),
    "METRICS_TOKEN": ("metrics-secret", None, lambda s: s.metrics_token, {}),
    "DISPATCHER_API_KEY": ("dk-1", None, lambda s: s.dispatcher.api_key, {}),
    "HELICONE_API_KEY": ("hk-1", None, lambda s: s.dispatcher.helicone_api_key, {}),
    "LUNARY_PUBLIC_KEY": ("lk-1", None, lambda s: s.dispatcher.lunary_public_key, {}),
    "DATABASE_URL": ("sqlite:///from/file.db", None, lambda s: s.database_url, {}),
    "REDIS_URL": ("redis://:pw@host:6379/0", None, lambda s: s.redis_url, {}),
    "RESPONSE_CACHE_REDIS_URL": (
        "redis://:pw@cache:6379/1",
        None,
        lambda s: s.response_cache and s.response_cache.redis_url,
        {"RESPONSE_CACHE": "on"},
    ),
}


def secret_file(tmp_path: Path, content: str | bytes, name: str = "secret") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_every_secret_setting_has_a_case() -> None:
    assert set(SECRET_SETTINGS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_secret_is_read_from_its_file(tmp_path: Path, name: str, ending: str) -> None:
    value, expected, read, needs = CASES[name]
    path = secret_file(tmp_path, value + ending)
    env = {"MANAGEMENT_TOKEN": TOKEN, **needs, f"{name}_FILE": str(path)}
    env.pop(name, None)
    assert read(Settings.from_env(env)) == (value if expected is None else expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_setting_a_secret_and_its_file_fails_naming_both(
    tmp_path: Path, name: str
) -> None:
    value, _, _, needs = CASES[name]
    env = {
        "MANAGEMENT_TOKEN": TOKEN,
        **needs,
        name: value,
        f"{name}_FILE": str(secret_file(tmp_path, value)),
    }
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    message = str(refused.value)
    assert f"{name} and {name}_FILE" in message
    assert value not in message


def test_a_missing_file_fails_naming_the_setting_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MANAGEMENT_TOKEN_FILE": str(missing)})
    message = str(refused.value)
    assert message.startswith("MANAGEMENT_TOKEN_FILE")
    assert str(missing) in message and "No such file" in message


def test_an_unreadable_file_fails_naming_the_setting_and_the_path(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ADMIN_PASSWORD_FILE": "/"})
    message = str(refused.value)
    assert message.startswith("ADMIN_PASSWORD_FILE") and "'/'" in message


@pytest.mark.parametrize("content", ["", "\n", "  \n", b""])
def test_an_empty_file_fails_naming_the_setting_and_the_path(
    tmp_path: Path, content: str | bytes
) -> None:
    path = secret_file(tmp_path, content)
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "METRICS_TOKEN_FILE": str(path)})
    message = str(refused.value)
    assert message.startswith("METRICS_TOKEN_FILE") and str(path) in message
    assert "empty" in message


def test_a_file_that_is_no_text_fails_without_showing_its_bytes(
    tmp_path: Path,
) -> None:
    path = secret_file(tmp_path, b"\xffs3cret\xfe")
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ENCRYPTION_KEY_FILE": str(path)})
    message = str(refused.value)
    assert message.startswith("ENCRYPTION_KEY_FILE") and str(path) in message
    assert "s3cret" not in message


def test_a_bad_value_from_a_file_is_refused_as_the_setting_never_shown(
    tmp_path: Path,
) -> None:
    path = secret_file(tmp_path, "c2VjcmV0\n")
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY must be base64") as refused:
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ENCRYPTION_KEY_FILE": str(path)})
    assert "c2VjcmV0" not in str(refused.value)


def test_an_empty_file_setting_counts_as_unset() -> None:
    env = {"MANAGEMENT_TOKEN": TOKEN, "MANAGEMENT_TOKEN_FILE": "", "METRICS_TOKEN": ""}
    assert Settings.from_env({**env, "METRICS_TOKEN_FILE": " "}).metrics_token is None


def test_the_environment_shadows_both_forms_of_a_dotenv_secret(tmp_path: Path) -> None:
    dotenv = secret_file(tmp_path, "MANAGEMENT_TOKEN=dotenv-token-0123456789\n", ".env")
    path = secret_file(tmp_path, "file-token-0123456789\n")
    merged = environ_with_dotenv({"MANAGEMENT_TOKEN_FILE": str(path)}, dotenv)
    assert Settings.from_env(merged).management_token == "file-token-0123456789"
    dotenv.write_text(f"MANAGEMENT_TOKEN_FILE={path}\n")
    merged = environ_with_dotenv({"MANAGEMENT_TOKEN": "env-token-0123456789"}, dotenv)
    assert Settings.from_env(merged).management_token == "env-token-0123456789"


def test_a_dotenv_may_name_a_secret_file(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "file-token-0123456789\n")
    dotenv = secret_file(tmp_path, f"MANAGEMENT_TOKEN_FILE={path}\n", ".env")
    settings = Settings.from_env(environ_with_dotenv({}, dotenv))
    assert settings.management_token == "file-token-0123456789"


def test_an_override_shadows_a_secret_file_of_the_environment(tmp_path: Path) -> None:
    env = {"MANAGEMENT_TOKEN_FILE": str(tmp_path / "absent")}
    settings = Settings.from_env(env, overrides={"MANAGEMENT_TOKEN": TOKEN})
    assert settings.management_token == TOKEN


def test_secret_setting_reads_either_form(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "from-a-file\n")
    assert (
        secret_setting({"MANAGEMENT_TOKEN": " given "}, "MANAGEMENT_TOKEN") == "given"
    )
    environ = {"MANAGEMENT_TOKEN_FILE": str(path)}
    assert secret_setting(environ, "MANAGEMENT_TOKEN") == "from-a-file"
    assert secret_setting({}, "MANAGEMENT_TOKEN") is None


def test_a_file_larger_than_any_secret_is_refused(tmp_path: Path) -> None:
    path = secret_file(tmp_path, "x" * (64 * 1024 + 1))
    with pytest.raises(ConfigError, match=r"METRICS_TOKEN_FILE: .* is larger than"):
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "METRICS_TOKEN_FILE": str(path)})
