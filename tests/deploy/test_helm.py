"""deploy/helm/llm-proxy: `helm lint`, `helm template` checked against Kubernetes'
schemas (kubernetes-validate), and the values sets the chart refuses."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_proxy.proxy.allowlist_file import parse_allowlist

from .tools import ROOT, SECRET_VALUES, proxy_settings, run, tool

CHART = ROOT / "deploy/helm/llm-proxy"
FLEET = ROOT / "deploy/helm/fleet-values.yaml"
KUBERNETES = "1.30.0"  # the oldest version still supported when the chart was written


def _template(*args: str) -> dict[str, dict[str, Any]]:
    """The rendered manifests by kind, validated against Kubernetes' schemas."""
    result = run(tool("helm"), "template", "llm-proxy", str(CHART), *args)
    assert result.returncode == 0, result.stderr
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rendered:
        rendered.write(result.stdout)
        rendered.flush()
        check = run(
            tool("kubernetes-validate"),
            *("--strict", "--quiet", "-k", KUBERNETES, rendered.name),
        )
    assert check.returncode == 0, check.stdout + check.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    manifests = {document["kind"]: document for document in documents}
    assert len(manifests) == len(documents), "one manifest of each kind"
    return manifests


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "<secret>") for item in container["env"]}


@pytest.mark.parametrize("values", [[], ["-f", str(FLEET)]], ids=["default", "fleet"])
def test_helm_lint_passes(values: list[str]) -> None:
    result = run(tool("helm"), "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_defaults_are_one_pod_on_sqlite_with_probes(tmp_path: Path) -> None:
    manifests = _template()
    assert set(manifests) == {"Deployment", "Service"}
    deployment = manifests["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    container = _container(manifests)
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = _env(container)
    assert "DATABASE_URL" not in env, "the image's SQLite file in /app/data"
    settings = proxy_settings(env, tmp_path)
    assert not settings.is_postgres and settings.redis_url is None


def test_the_fleet_values_are_three_pods_on_postgres_and_redis(
    tmp_path: Path,
) -> None:
    manifests = _template("-f", str(FLEET))
    assert set(manifests) == {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
    }
    assert manifests["Deployment"]["spec"]["replicas"] == 3
    container = _container(manifests)
    env = _env(container)
    settings = proxy_settings(env, tmp_path)
    assert settings.is_postgres
    assert settings.redis_url == "redis://redis-master.redis.svc:6379/0"
    assert settings.workers == 2
    assert settings.management_token == SECRET_VALUES["MANAGEMENT_TOKEN"]
    assert env["PGPASSWORD"] == "<secret>"
    assert not {"MANAGEMENT_TOKEN", "ENCRYPTION_KEY"} & set(env)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(env["MANAGEMENT_TOKEN_FILE"]).parent == Path(mounts["secrets"])
    assert Path(env["ENCRYPTION_KEY_FILE"]).parent == Path(mounts["secrets"])
    (allowlist_file,) = manifests["ConfigMap"]["data"].items()
    assert Path(env["API_CONFIG_PATH"]) == Path(mounts["allowlist"], allowlist_file[0])
    allowlist = parse_allowlist(allowlist_file[1], source="ConfigMap")
    assert "/v1/chat/completions" in {e.path for e in allowlist.endpoints}


def test_autoscaling_renders_an_hpa_and_leaves_replicas_to_it() -> None:
    manifests = _template("-f", str(FLEET), "--set", "autoscaling.enabled=true")
    hpa = manifests["HorizontalPodAutoscaler"]
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == manifests["Deployment"]["metadata"]["name"]
    )
    assert "replicas" not in manifests["Deployment"]["spec"]
    assert "PodDisruptionBudget" in manifests


def test_sqlite_with_persistence_recreates_its_one_pod() -> None:
    manifests = _template("--set", "persistence.enabled=true")
    deployment = manifests["Deployment"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    claim = manifests["PersistentVolumeClaim"]["metadata"]["name"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim}} in volumes


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            ["--set", "replicaCount=2", "--set", "redis.url=redis://r:6379/0"],
            "database.url",
        ),
        (
            ["--set", "autoscaling.enabled=true", "--set", "redis.url=redis://r"],
            "database.url",
        ),
        (
            ["-f", str(FLEET), "--set", "database.url=sqlite:///./data/llm-proxy.db"],
            "database.url",
        ),
        (["-f", str(FLEET), "--set", "redis.url="], "redis.url"),
        (["--set", "workers=2"], "redis.url"),
        (
            ["-f", str(FLEET), "--set", "secrets.encryptionKeyKey="],
            "secrets.encryptionKeyKey",
        ),
        (["-f", str(FLEET), "--set", "env.ADMIN_USER=admin"], "env.ADMIN_USER"),
        (["--set", "database.url=mysql://db/proxy"], "database.url"),
    ],
    ids=[
        "sqlite-2-replicas",
        "sqlite-autoscaled",
        "sqlite-url-3-replicas",
        "no-redis-3-replicas",
        "no-redis-2-workers",
        "postgres-without-key",
        "admin-in-a-fleet",
        "unknown-database",
    ],
)
def test_the_chart_refuses_what_the_proxy_cannot_run(
    values: list[str], named: str
) -> None:
    result = run(tool("helm"), "template", "llm-proxy", str(CHART), *values)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr
