"""Per-token policy and project defaults in both databases (migration 007)."""

from __future__ import annotations

from datetime import timedelta

from llm_proxy.storage import ProjectChanges, Repository, TokenPolicy, TokenUsage
from llm_proxy.storage._common import dump_policy, load_policy

from .test_repository import (  # noqa: F401  (the fixtures, by name)
    NOW,
    add_project,
    add_token,
    new_repository,
    repository,
)

FULL = TokenPolicy(
    bind={"user_id": "alice", "client": "web-1"},
    allowed_models=("gpt-4o-mini", "gpt-4.1-*"),
    max_output_tokens_cap=1000,
    allow_streaming=False,
)
DEFAULTS = TokenPolicy(allowed_models=("gpt-4o*",), max_output_tokens_cap=4000)


def test_policy_json_keeps_only_what_narrows() -> None:
    assert dump_policy(None) is None
    assert dump_policy(TokenPolicy()) is None  # an empty policy is no policy
    assert load_policy(None) is None
    text = dump_policy(FULL)
    assert text is not None
    assert load_policy(text) == FULL
    assert (
        dump_policy(TokenPolicy(allow_streaming=False)) == '{"allow_streaming":false}'
    )


async def test_token_policy_round_trips_in_every_read(
    repository: Repository,  # noqa: F811
) -> None:
    project = await add_project(repository, policy=DEFAULTS)
    token = await add_token(repository, project, policy=FULL)
    plain = await add_token(repository, project, token_hint="abcd")
    assert plain.policy is None
    assert await repository.get_project(project.id) == project
    assert await repository.get_token(token.id) == token
    assert await repository.get_token_by_hash(token.token_hash) == token
    assert await repository.get_token(plain.id) == plain
    changed = await repository.load_tokens_changed_since(0, limit=10)
    assert {t.id: t.policy for t in changed.rows} == {token.id: FULL, plain.id: None}
    projects = await repository.load_projects_changed_since(0, limit=10)
    assert [p.policy for p in projects.rows] == [DEFAULTS]


async def test_token_policy_survives_usage_writes(
    repository: Repository,  # noqa: F811
) -> None:
    project = await add_project(repository)
    token = await add_token(repository, project, policy=FULL)
    await repository.record_token_usage([TokenUsage(token.id, 3, NOW)])
    stored = await repository.get_token(token.id)
    assert stored is not None and stored.policy == FULL and stored.request_count == 3


async def test_project_policy_is_set_kept_and_cleared(
    repository: Repository,  # noqa: F811
) -> None:
    project = await add_project(repository)
    assert project.policy is None
    later = NOW + timedelta(hours=1)
    set_ = await repository.update_project(
        project.id, ProjectChanges(policy=DEFAULTS), now=later
    )
    assert set_ is not None and set_.policy == DEFAULTS
    kept = await repository.update_project(
        project.id, ProjectChanges(description="d"), now=later
    )
    assert kept is not None and kept.policy == DEFAULTS
    cleared = await repository.update_project(
        project.id, ProjectChanges(clear_policy=True), now=later
    )
    assert cleared is not None and cleared.policy is None
    assert await repository.get_project(project.id) == cleared
