"""Settings parsing and validation."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llm_proxy.config import (
    ConfigError,
    Settings,
    environ_with_dotenv,
    parse_listen_addr,
    read_dotenv,
)

TOKEN = "0123456789abcdef"
KEY = base64.b64encode(bytes(range(32))).decode()


def test_settings_defaults_match_the_go_version() -> None:
    settings = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN})
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 8080)
    assert settings.database_url == "sqlite:///./data/llm-proxy.db"
    assert str(settings.upstream.base_url) == "https://api.openai.com"
    assert settings.log_format == "json" and settings.log_level == "info"
    assert settings.max_request_bytes == 50 * 1024 * 1024
    assert settings.default_rate_limit_per_hour == 1000
    assert not settings.admin_enabled


def test_settings_require_management_token() -> None:
    with pytest.raises(ConfigError, match="MANAGEMENT_TOKEN is required"):
        Settings.from_env({})


def test_settings_refuse_short_management_token() -> None:
    with pytest.raises(ConfigError, match="MANAGEMENT_TOKEN must be at least 16"):
        Settings.from_env({"MANAGEMENT_TOKEN": "short"})


def test_settings_repr_hides_secrets() -> None:
    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": TOKEN,
            "ENCRYPTION_KEY": KEY,
            "ADMIN_USER": "admin",
            "ADMIN_PASSWORD": "a-long-admin-password",
        }
    )
    shown = repr(settings)
    assert TOKEN not in shown and KEY not in shown
    assert "a-long-admin-password" not in shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:8081", ("::1", 8081)),
    ],
)
def test_listen_addr_forms(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen_addr(value) == expected


@pytest.mark.parametrize("value", ["8080", ":0", ":99999", "host:", "host:http"])
def test_listen_addr_errors_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="LISTEN_ADDR"):
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "LISTEN_ADDR": value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://x"),
        ("OPENAI_API_URL", "ftp://example.com"),
        ("OPENAI_API_URL", "https://example.com/?a=1"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("MAX_REQUEST_BYTES", "lots"),
        ("MAX_REQUEST_BYTES", "0"),
        ("UPSTREAM_CONNECT_TIMEOUT", "-1"),
        ("UPSTREAM_READ_TIMEOUT", "soon"),
        ("FORWARD_CLIENT_IP", "maybe"),
        ("REDIS_URL", "http://localhost"),
        ("LLM_PROXY_EVENT_BUS", "kafka"),
        ("ENCRYPTION_KEY", "dG9vIHNob3J0"),
        ("ENCRYPTION_KEY", "not base64 at all!"),
        ("ADMIN_PASSWORD", "short"),
        ("EVENT_BUFFER_SIZE", "0"),
        ("EVENT_BATCH_SIZE", "many"),
        ("EVENT_FLUSH_INTERVAL", "0"),
        ("EVENT_LOG_MAX_BYTES", "-1"),
        ("EVENT_LOG_BACKUPS", "some"),
        ("LOG_BODIES", "sometimes"),
        ("LOG_BODY_MAX_BYTES", "0"),
        ("STREAM_CAPTURE_MAX_BYTES", "10"),
        ("DISPATCHER_MAX_RETRIES", "-2"),
        ("DISPATCHER_RETRY_BASE", "never"),
        ("DISPATCHER_RETRY_MAX", "0"),
        ("DISPATCHER_TIMEOUT", "-5"),
        ("DISPATCHER_DRAIN_TIMEOUT", "x"),
        ("LOGGING_URL", "ftp://collector"),
        ("TRUSTED_PROXIES", "nginx"),
        ("TOKEN_MAX_CONCURRENT", "0"),
        ("PROJECT_MAX_CONCURRENT", "lots"),
        ("UPSTREAM_POOL_TIMEOUT", "0"),
        ("CLIENT_HEADER_TIMEOUT", "-1"),
        ("MAX_CLIENT_CONNECTIONS", "0"),
        ("MAX_HEADER_BYTES", "100"),
        ("REDIS_FAILURE_MODE", "sometimes"),
        ("REDIS_LIMITS_TIMEOUT", "0"),
        ("FLEET_LEASE_MAX", "0"),
    ],
)
def test_bad_values_fail_naming_the_setting(name: str, value: str) -> None:
    env = {"MANAGEMENT_TOKEN": TOKEN, name: value}
    if name == "ADMIN_PASSWORD":
        env["ADMIN_USER"] = "admin"
    with pytest.raises(ConfigError, match=name):
        Settings.from_env(env)


def test_encryption_key_error_never_shows_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ENCRYPTION_KEY": "c2VjcmV0"})
    assert "c2VjcmV0" not in str(caught.value)


def test_encryption_key_accepts_standard_and_urlsafe_base64() -> None:
    raw = bytes([251] * 32)
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        env = {"MANAGEMENT_TOKEN": TOKEN, "ENCRYPTION_KEY": encoded.decode()}
        assert Settings.from_env(env).encryption_key == raw


def test_postgres_requires_encryption_key() -> None:
    env = {"MANAGEMENT_TOKEN": TOKEN, "DATABASE_URL": "postgres://u@h/db"}
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY is required"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "ENCRYPTION_KEY": KEY}).is_postgres


def test_settings_and_storage_read_database_urls_alike() -> None:
    env = {"MANAGEMENT_TOKEN": TOKEN, "ENCRYPTION_KEY": KEY}
    upper = Settings.from_env({**env, "DATABASE_URL": "PostgreSQL://u@h/db"})
    assert upper.is_postgres and upper.database.sqlite_path is None
    sqlite = Settings.from_env({**env, "DATABASE_URL": "sqlite:////srv/proxy.db"})
    assert sqlite.database.sqlite_path == Path("/srv/proxy.db")


def test_database_url_error_hides_password() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(
            {"MANAGEMENT_TOKEN": TOKEN, "DATABASE_URL": "mysql://u:pw@h/db"}
        )
    assert "pw@" not in str(caught.value)


def test_admin_needs_both_user_and_password() -> None:
    with pytest.raises(ConfigError, match="ADMIN_PASSWORD must be set"):
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ADMIN_USER": "admin"})
    with pytest.raises(ConfigError, match="ADMIN_USER must be set"):
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "ADMIN_PASSWORD": "x" * 12})


def test_redis_bus_requires_redis_url() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL is required"):
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "LLM_PROXY_EVENT_BUS": "redis"})


def test_cli_overrides_win_over_environment() -> None:
    settings = Settings.from_env(
        {"MANAGEMENT_TOKEN": TOKEN, "LISTEN_ADDR": ":8080"},
        overrides={"LISTEN_ADDR": "127.0.0.1:9999"},
    )
    assert settings.listen_port == 9999


def test_upstream_base_url_keeps_path_prefix() -> None:
    settings = Settings.from_env(
        {"MANAGEMENT_TOKEN": TOKEN, "OPENAI_API_URL": "https://host/openai/"}
    )
    assert str(settings.upstream.base_url) == "https://host/openai"


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\nexport MANAGEMENT_TOKEN='from-dotenv-0123456789'\n"
        'LOG_LEVEL="debug"\nLISTEN_ADDR=:7000 # trailing comment\n\n'
    )
    merged = environ_with_dotenv({"LOG_LEVEL": "error"}, dotenv)
    settings = Settings.from_env(merged)
    assert settings.management_token == "from-dotenv-0123456789"
    assert settings.log_level == "error"
    assert settings.listen_port == 7000


def test_dotenv_missing_file_is_fine(tmp_path: Path) -> None:
    assert environ_with_dotenv({"A": "1"}, tmp_path / "absent") == {"A": "1"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("GOOD=1\nthis is not an assignment\n", 2),
        ("GOOD=1\n\n# a comment\n\nBARE_NAME\n", 5),
        ("\n\nA='unclosed\n", 3),
    ],
)
def test_dotenv_bad_line_names_file_and_line(
    tmp_path: Path, text: str, line: int
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(text)
    with pytest.raises(ConfigError, match=rf"\.env:{line}: expected KEY=VALUE"):
        read_dotenv(dotenv)


def test_dotenv_values_are_taken_literally_and_double_quotes_escape(
    tmp_path: Path,
) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "ADMIN_PASSWORD=pa$$word-${HOME}\nA='single ${HOME} \\n'\nB=\"two\\nlines\"\n"
    )
    assert read_dotenv(dotenv) == {
        "ADMIN_PASSWORD": "pa$$word-${HOME}",
        "A": "single ${HOME} \\n",
        "B": "two\nlines",
    }


def test_event_and_dispatcher_settings_have_safe_defaults() -> None:
    settings = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN})
    events, dispatcher = settings.events, settings.dispatcher
    assert events.buffer_size == 10_000 and not events.log_bodies
    assert (events.log_max_bytes, events.log_backups) == (100 * 1024 * 1024, 5)
    assert dispatcher.max_retries == 5 and dispatcher.endpoint is None


def test_event_and_dispatcher_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": TOKEN,
            "EVENT_BUFFER_SIZE": "50",
            "EVENT_LOG_MAX_BYTES": "0",
            "LOG_BODIES": "on",
            "LOG_BODY_MAX_BYTES": "1024",
            "LOGGING_URL": "https://collector.example/events",
            "DISPATCHER_API_KEY": "secret-dispatcher-key",
            "DISPATCHER_RETRY_BASE": "0.1s",
        }
    )
    assert settings.events.buffer_size == 50 and settings.events.log_max_bytes == 0
    assert settings.events.log_bodies and settings.events.log_body_max_bytes == 1024
    assert settings.dispatcher.endpoint == "https://collector.example/events"
    assert settings.dispatcher.retry_base_s == 0.1
    assert "secret-dispatcher-key" not in repr(settings)


def test_dispatcher_retry_max_must_not_be_below_the_base() -> None:
    env = {
        "MANAGEMENT_TOKEN": TOKEN,
        "DISPATCHER_RETRY_BASE": "5",
        "DISPATCHER_RETRY_MAX": "1",
    }
    with pytest.raises(ConfigError, match="DISPATCHER_RETRY_MAX"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("given", "level"), [("warn", "warning"), ("WARNING", "warning")]
)
def test_log_level_spellings(given: str, level: str) -> None:
    settings = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, "LOG_LEVEL": given})
    assert settings.log_level == level


def test_event_log_defaults_to_a_jsonl_file_and_can_be_turned_off() -> None:
    settings = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN})
    assert settings.file_event_log == Path("./data/events.jsonl")
    for off in ("off", "none", "OFF"):
        env = {"MANAGEMENT_TOKEN": TOKEN, "FILE_EVENT_LOG": off}
        assert Settings.from_env(env).file_event_log is None
    env = {"MANAGEMENT_TOKEN": TOKEN, "FILE_EVENT_LOG": "/var/log/e.jsonl"}
    assert Settings.from_env(env).file_event_log == Path("/var/log/e.jsonl")


def test_redis_stream_is_capped_by_default_and_zero_never_trims() -> None:
    assert (
        Settings.from_env({"MANAGEMENT_TOKEN": TOKEN}).events.stream_maxlen == 1_000_000
    )
    env = {"MANAGEMENT_TOKEN": TOKEN, "EVENT_STREAM_MAXLEN": "0"}
    assert Settings.from_env(env).events.stream_maxlen is None


def test_hostile_traffic_limits_have_defaults_and_are_read() -> None:
    default = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN})
    assert default.trusted_proxies == ()
    assert default.listener.header_timeout_s == 60.0
    assert default.listener.max_connections is None  # auto: from the fd limit
    assert default.listener.max_header_bytes == 64 * 1024
    assert default.tenant_limits.token_max_concurrent == 100
    assert default.tenant_limits.project_max_concurrent == 250
    assert default.upstream.pool_timeout_s == 5.0
    settings = Settings.from_env(
        {
            "MANAGEMENT_TOKEN": TOKEN,
            "TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8,::1",
            "TOKEN_MAX_CONCURRENT": "3",
            "PROJECT_MAX_CONCURRENT": "7",
            "UPSTREAM_POOL_TIMEOUT": "0.5",
            "CLIENT_HEADER_TIMEOUT": "2s",
            "MAX_CLIENT_CONNECTIONS": "500",
            "MAX_HEADER_BYTES": "8192",
        }
    )
    assert [str(n) for n in settings.trusted_proxies] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
    ]
    assert settings.tenant_limits.token_max_concurrent == 3
    assert settings.tenant_limits.project_max_concurrent == 7
    assert settings.upstream.pool_timeout_s == 0.5
    assert settings.listener.header_timeout_s == 2.0
    assert settings.listener.max_connections == 500
    assert settings.listener.max_header_bytes == 8192


def test_a_short_admin_password_is_refused_saying_why() -> None:
    env = {"MANAGEMENT_TOKEN": TOKEN, "ADMIN_USER": "admin", "ADMIN_PASSWORD": "secret"}
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    message = str(refused.value)
    assert "at least 12 characters, got 6" in message
    assert "mint tokens" in message and "'secret'" not in message  # never echoed


def test_fleet_limit_settings_default_to_fail_open_and_parse() -> None:
    default = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN}).fleet_limits
    assert (default.fail_closed, default.lease_max, default.timeout_s) == (
        False,
        256,
        0.25,
    )
    env = {
        "MANAGEMENT_TOKEN": TOKEN,
        "REDIS_FAILURE_MODE": "closed",
        "FLEET_LEASE_MAX": "5",
        "REDIS_LIMITS_TIMEOUT": "0.5",
    }
    limits = Settings.from_env(env).fleet_limits
    assert (limits.fail_closed, limits.lease_max, limits.timeout_s) == (True, 5, 0.5)
