"""`llm-proxy manage project create|update --cache-ttl SECONDS --clear-cache-ttl`."""

from __future__ import annotations

from . import test_cli
from .test_cli import UPSTREAM_KEY, LiveProxy, invoke, json_out

# The live proxy and the clean environment of the CLI tests.
live = test_cli.live
clean_env = test_cli.clean_env


def test_manage_project_cache_ttl_is_set_changed_and_cleared(live: LiveProxy) -> None:
    created = json_out(
        invoke(
            ["manage", "project", "create", "--name", "cached", "--json"]
            + ["--cache-ttl", "600"],
            live.env(OPENAI_API_KEY=UPSTREAM_KEY),
        )
    )
    assert created["cache_ttl_seconds"] == 600
    project_id = created["project_id"]
    never = json_out(
        invoke(
            ["manage", "project", "update", project_id, "--cache-ttl", "0", "--json"],
            live.env(),
        )
    )
    assert never["cache_ttl_seconds"] == 0
    cleared = json_out(
        invoke(
            ["manage", "project", "update", project_id, "--clear-cache-ttl", "--json"],
            live.env(),
        )
    )
    assert cleared["cache_ttl_seconds"] is None
    shown = invoke(["manage", "project", "get", project_id], live.env())
    assert "cache_ttl_seconds" in shown.output


def test_manage_project_cache_ttl_out_of_range_is_a_usage_error(
    live: LiveProxy,
) -> None:
    result = invoke(
        ["manage", "project", "create", "--name", "x", "--cache-ttl", "-1"],
        live.env(OPENAI_API_KEY=UPSTREAM_KEY),
    )
    assert result.exit_code == 2
    assert "--cache-ttl" in result.stderr and "not in the range" in result.stderr


def test_manage_project_cache_ttl_options_conflict_is_a_usage_error(
    live: LiveProxy,
) -> None:
    result = invoke(
        ["manage", "project", "update", "some-id", "--clear-cache-ttl"]
        + ["--cache-ttl", "60"],
        live.env(),
    )
    assert result.exit_code == 2
    assert "exclude each other" in result.stderr
