"""`llm-proxy manage project create|update --allowed-origin URL --require-origin`."""

from __future__ import annotations

from . import test_cli
from .test_cli import UPSTREAM_KEY, LiveProxy, invoke, json_out

# The live proxy and the clean environment of the CLI tests.
live = test_cli.live
clean_env = test_cli.clean_env


def test_manage_project_origins_are_set_replaced_and_cleared(live: LiveProxy) -> None:
    created = json_out(
        invoke(
            ["manage", "project", "create", "--name", "web", "--json"]
            + ["--allowed-origin", "https://App.example.com"]
            + ["--allowed-origin", "https://*.example.org", "--require-origin"],
            live.env(OPENAI_API_KEY=UPSTREAM_KEY),
        )
    )
    assert created["allowed_origins"] == [
        "https://app.example.com",
        "https://*.example.org",
    ]
    assert created["require_origin"] is True
    project_id = created["project_id"]
    replaced = json_out(
        invoke(
            ["manage", "project", "update", project_id, "--json"]
            + ["--allowed-origin", "http://localhost:5173", "--no-require-origin"],
            live.env(),
        )
    )
    assert replaced["allowed_origins"] == ["http://localhost:5173"]
    assert replaced["require_origin"] is False
    cleared = json_out(
        invoke(
            ["manage", "project", "update", project_id, "--json"]
            + ["--clear-allowed-origins"],
            live.env(),
        )
    )
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


def test_manage_project_origin_options_conflict_is_a_usage_error(
    live: LiveProxy,
) -> None:
    result = invoke(
        ["manage", "project", "update", "some-id", "--clear-allowed-origins"]
        + ["--allowed-origin", "https://a.example"],
        live.env(),
    )
    assert result.exit_code == 2
