"""The policy options of `llm-proxy manage token generate` and `project create|update`."""

from __future__ import annotations

from .test_cli import (  # noqa: F401  (the fixtures, by name)
    UPSTREAM_KEY,
    LiveProxy,
    clean_env,
    create_project,
    create_token,
    invoke,
    json_out,
    live,
)


def test_a_token_is_minted_with_a_policy_and_shows_it(
    live: LiveProxy,  # noqa: F811
) -> None:
    project_id = create_project(live)["project_id"]
    token = create_token(
        live,
        project_id,
        *("--bind", "user_id=alice", "--bind", "team=ml=blue"),
        *("--allowed-model", "gpt-4o-mini", "--allowed-model", "o1*"),
        *("--max-output-tokens-cap", "1000", "--no-streaming"),
    )
    assert token["bind"] == {"user_id": "alice", "team": "ml=blue"}
    assert token["allowed_models"] == ["gpt-4o-mini", "o1*"]
    assert (token["max_output_tokens_cap"], token["allow_streaming"]) == (1000, False)
    shown = invoke(["manage", "token", "get", token["token_id"]], live.env())
    assert shown.exit_code == 0
    assert (
        '"user_id":"alice"' in shown.output and "max_output_tokens_cap" in shown.output
    )
    plain = create_token(live, project_id)
    assert (plain["bind"], plain["allowed_models"]) == ({}, None)


def test_bad_policy_options_are_refused(live: LiveProxy) -> None:  # noqa: F811
    project_id = create_project(live)["project_id"]
    generate = ["manage", "token", "generate", "--project-id", project_id]
    no_pair = invoke([*generate, "--bind", "alice"], live.env())
    assert no_pair.exit_code == 2 and "KEY=VALUE" in no_pair.output
    bad_key = invoke([*generate, "--bind", "User=alice"], live.env())
    assert bad_key.exit_code == 1 and "bind key 'User'" in bad_key.stderr
    too_big = invoke([*generate, "--max-output-tokens-cap", "0"], live.env())
    assert too_big.exit_code == 2


def test_project_defaults_are_set_changed_and_cleared(
    live: LiveProxy,  # noqa: F811
) -> None:
    created = json_out(
        invoke(
            ["manage", "project", "create", "--name", "capped", "--json"]
            + ["--allowed-model", "gpt-4o*", "--max-output-tokens-cap", "500"],
            live.env(OPENAI_API_KEY=UPSTREAM_KEY),
        )
    )
    assert (created["allowed_models"], created["max_output_tokens_cap"]) == (
        ["gpt-4o*"],
        500,
    )
    update = ["manage", "project", "update", created["project_id"], "--json"]
    narrowed = json_out(invoke([*update, "--no-streaming"], live.env()))
    assert narrowed["allow_streaming"] is False and narrowed["allowed_models"] == [
        "gpt-4o*"
    ]
    cleared = json_out(invoke([*update, "--any-model", "--no-output-cap"], live.env()))
    assert (cleared["allowed_models"], cleared["max_output_tokens_cap"]) == (None, None)
    both = invoke([*update, "--any-model", "--allowed-model", "x"], live.env())
    assert both.exit_code == 2 and "exclude each other" in both.output
