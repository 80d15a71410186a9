"""`llm-proxy manage project create|update` options beyond the basics: browser origins
(`--allowed-origin`, `--require-origin`), the response cache lifetime (`--cache-ttl`,
`--clear-cache-ttl`), and the pairs that exclude each other."""

from __future__ import annotations

import pytest

from . import test_cli
from .test_cli import (
    UPSTREAM_KEY,
    LiveProxy,
    create_project,
    invoke,
    update_project,
)

# The live proxy and the clean environment of the CLI tests.
live = test_cli.live
clean_env = test_cli.clean_env


def test_manage_project_origins_are_set_replaced_and_cleared(live: LiveProxy) -> None:
    created = create_project(
        live,
        "web",
        *("--allowed-origin", "https://App.example.com"),
        *("--allowed-origin", "https://*.example.org", "--require-origin"),
    )
    assert created["allowed_origins"] == [
        "https://app.example.com",
        "https://*.example.org",
    ]
    assert created["require_origin"] is True
    project_id = created["project_id"]
    replaced = update_project(
        live,
        project_id,
        *("--allowed-origin", "http://localhost:5173", "--no-require-origin"),
    )
    assert replaced["allowed_origins"] == ["http://localhost:5173"]
    assert replaced["require_origin"] is False
    cleared = update_project(live, project_id, "--clear-allowed-origins")
    assert cleared["allowed_origins"] == []
    shown = invoke(["manage", "project", "get", project_id], live.env())
    assert "allowed_origins" in shown.output


def test_manage_project_bad_origin_shows_the_api_message(live: LiveProxy) -> None:
    result = invoke(
        ["manage", "project", "create", "--name", "bad"]
        + ["--allowed-origin", "https://app.example.com/path"],
        live.env(OPENAI_API_KEY=UPSTREAM_KEY),
    )
    assert result.exit_code == 1
    assert "allowed_origins" in result.stderr and "no path" in result.stderr


def test_manage_project_cache_ttl_is_set_changed_and_cleared(live: LiveProxy) -> None:
    created = create_project(live, "cached", "--cache-ttl", "600")
    assert created["cache_ttl_seconds"] == 600
    project_id = created["project_id"]
    never = update_project(live, project_id, "--cache-ttl", "0")
    assert never["cache_ttl_seconds"] == 0
    cleared = update_project(live, project_id, "--clear-cache-ttl")
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


@pytest.mark.parametrize(
    "options",
    [
        ["--clear-cache-ttl", "--cache-ttl", "60"],
        ["--clear-allowed-origins", "--allowed-origin", "https://a.example"],
    ],
)
def test_manage_project_options_that_exclude_each_other_are_a_usage_error(
    live: LiveProxy, options: list[str]
) -> None:
    result = invoke(["manage", "project", "update", "some-id", *options], live.env())
    assert result.exit_code == 2
    assert "exclude each other" in result.stderr
