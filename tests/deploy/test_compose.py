"""docker-compose.yml, as `docker-compose config` reads it: the fleet's shape and settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from llm_proxy.proxy.allowlist_file import load_allowlist

from .tools import ROOT, SECRET_VALUES, proxy_settings, run, tool

PROXIES = ("proxy-1", "proxy-2")
SERVICES = {*PROXIES, "dispatcher", "nginx", "postgres", "redis"}


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from either the short or the long syntax."""
    mounts: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, mode == ["ro"])
        else:
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The resolved file; an empty --env-file keeps a developer's .env out of it."""
    env_file = tmp_path_factory.mktemp("compose") / "empty.env"
    env_file.write_text("")
    result = run(tool("docker-compose"), "--env-file", str(env_file), "config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_stack_is_two_proxies_a_dispatcher_postgres_redis_and_nginx(
    compose: dict[str, Any],
) -> None:
    assert set(compose["services"]) == SERVICES
    proxies = [s for s in compose["services"] if s.startswith("proxy")]
    assert sorted(proxies) == list(PROXIES)


@pytest.mark.parametrize("name", PROXIES)
def test_every_replica_shares_postgres_and_redis(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    env = compose["services"][name]["environment"]
    database = urlsplit(env["DATABASE_URL"])
    assert database.scheme == "postgresql"
    assert database.hostname == "postgres"
    assert database.password is None, "the password comes from a secret file"
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["LLM_PROXY_EVENT_BUS"] == "redis"
    assert int(env["WORKERS"]) > 1
    assert not {"ADMIN_USER", "ADMIN_PASSWORD"} & set(env)
    settings = proxy_settings(env, tmp_path)
    assert settings.is_postgres
    assert settings.workers == int(env["WORKERS"])
    assert settings.management_token == SECRET_VALUES["MANAGEMENT_TOKEN"]
    assert settings.file_event_log is None, "the dispatcher writes the one log"


@pytest.mark.parametrize("name", PROXIES)
def test_secrets_are_files_of_docker_secrets_never_environment(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    service = compose["services"][name]
    env = service["environment"]
    assert not {"MANAGEMENT_TOKEN", "ENCRYPTION_KEY", "PGPASSWORD"} & set(env)
    files = {
        k: v for k, v in env.items() if k.endswith("FILE") and k != "FILE_EVENT_LOG"
    }
    assert set(files) == {"MANAGEMENT_TOKEN_FILE", "ENCRYPTION_KEY_FILE", "PGPASSFILE"}
    mounted = {f"/run/secrets/{secret['source']}" for secret in service["secrets"]}
    assert set(files.values()) == mounted
    assert {s["source"] for s in service["secrets"]} <= set(compose["secrets"])


@pytest.mark.parametrize("name", PROXIES)
def test_replicas_check_readiness_and_keep_apart_names_and_volumes(
    compose: dict[str, Any], name: str, tmp_path: Path
) -> None:
    service = compose["services"][name]
    assert service["hostname"] == name, "stable Redis consumer names"
    assert any("/ready" in part for part in service["healthcheck"]["test"])
    assert _volumes(service)["/app/data"] == (f"{name}-data", False)
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_replicas_serve_the_mounted_allowlist(compose: dict[str, Any]) -> None:
    for name in PROXIES:
        service = compose["services"][name]
        path = service["environment"]["API_CONFIG_PATH"]
        source, read_only = _volumes(service)[path]
        assert read_only
        paths = {endpoint.path for endpoint in load_allowlist(Path(source)).endpoints}
        assert "/v1/chat/completions" in paths


def test_the_dispatcher_writes_every_event_from_the_same_redis(
    compose: dict[str, Any],
) -> None:
    dispatcher = compose["services"]["dispatcher"]
    assert dispatcher["command"][:3] == ["dispatcher", "--service", "file"]
    assert "--consumer-name" in dispatcher["command"]
    redis_urls = {compose["services"][p]["environment"]["REDIS_URL"] for p in PROXIES}
    assert redis_urls == {dispatcher["environment"]["REDIS_URL"]}
    assert "/metrics" in " ".join(dispatcher["healthcheck"]["test"])


def test_nginx_balances_over_exactly_the_replicas(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    source, read_only = _volumes(nginx)["/etc/nginx/conf.d/default.conf"]
    assert Path(source) == ROOT / "deploy/nginx/compose.conf" and read_only
    servers = re.findall(r"^\s*server (\S+):(\d+)", Path(source).read_text(), re.M)
    assert sorted(servers) == [(name, "8080") for name in PROXIES]
    for name in PROXIES:
        assert compose["services"][name]["environment"]["LISTEN_ADDR"] == ":8080"
    assert {p["target"] for p in nginx["ports"]} == {80, 443}
    assert all("ports" not in compose["services"][name] for name in PROXIES)


def test_redis_keeps_limits_and_events_across_restarts(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options == {
        "--appendonly": "yes",
        "--appendfsync": "everysec",
        "--maxmemory-policy": "noeviction",
    }
