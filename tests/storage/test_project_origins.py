"""A project's browser origins (migration 008): stored, changed and reloaded alike on
every backend."""

from __future__ import annotations

import pytest

from llm_proxy.storage import ProjectChanges, Repository

from . import test_repository
from .test_repository import HOUR, NOW, add_project

# The backends' fixtures, shared with the repository tests.
new_repository = test_repository.new_repository
repository = test_repository.repository

ORIGINS = ("https://app.example.com", "https://*.example.org", "http://localhost:5173")


async def test_repository_project_origins_round_trip(repository: Repository) -> None:
    plain = await add_project(repository, "plain")
    assert (plain.allowed_origins, plain.require_origin) == ((), False)
    browser = await add_project(
        repository, "browser", allowed_origins=ORIGINS, require_origin=True
    )
    assert await repository.get_project(plain.id) == plain
    assert await repository.get_project(browser.id) == browser
    listed = await repository.list_projects(limit=10, offset=0)
    assert sorted(listed, key=lambda p: p.name) == [browser, plain]
    changed = await repository.load_projects_changed_since(0, limit=10)
    assert sorted(changed.rows, key=lambda p: p.name) == [browser, plain]


async def test_repository_project_origins_change_only_when_given(
    repository: Repository,
) -> None:
    project = await add_project(repository, allowed_origins=ORIGINS)
    later = NOW + HOUR
    mark = await repository.change_mark()
    untouched = await repository.update_project(
        project.id, ProjectChanges(description="d"), now=later
    )
    assert untouched is not None
    assert (untouched.allowed_origins, untouched.require_origin) == (ORIGINS, False)
    changed = await repository.update_project(
        project.id,
        ProjectChanges(allowed_origins=ORIGINS[:1], require_origin=True),
        now=later,
    )
    assert changed is not None
    assert (changed.allowed_origins, changed.require_origin) == (ORIGINS[:1], True)
    assert (await repository.load_projects_changed_since(mark, limit=10)).rows == [
        changed
    ]
    cleared = await repository.update_project(
        project.id,
        ProjectChanges(allowed_origins=(), require_origin=False),
        now=later,
    )
    assert cleared is not None
    assert (cleared.allowed_origins, cleared.require_origin) == ((), False)
    assert await repository.get_project(project.id) == cleared


async def test_repository_refuses_more_than_32_origins(repository: Repository) -> None:
    many = tuple(f"https://h{n}.example" for n in range(33))
    with pytest.raises(Exception, match="(?i)check"):
        await add_project(repository, allowed_origins=many)
