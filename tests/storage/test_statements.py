"""The SQL both backends share: written once, rendered per dialect, run by the backend."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from llm_proxy.storage import Project, Token, backend, postgres, sqlite
from llm_proxy.storage.statements import (
    CHANGE_SEQ,
    PROJECT_COLUMNS,
    TOKEN_COLUMNS,
    Dialect,
    Statements,
)

from .test_repository import DB_CALLS

DIALECT_MODULES = [sqlite, postgres]
# The driver calls backend.py makes, and its helpers that take a statement.
BACKEND_CALLS = DB_CALLS | {
    "_write_returning",
    "_write_many",
    "_by_id",
    "_write_by_id",
    "_changes",
}


def _names(columns: str) -> list[str]:
    return [name.strip() for name in columns.split(",")]


def test_token_columns_follow_the_token_fields_so_rows_convert_by_position() -> None:
    renamed = {"token": "token_hash"}
    columns = [renamed.get(name, name) for name in _names(TOKEN_COLUMNS)]
    assert [*columns, "change_seq"] == [field.name for field in fields(Token)]
    assert CHANGE_SEQ == len(columns)  # change_seq is selected after them


def test_project_columns_follow_the_project_fields() -> None:
    renamed = {"openai_api_key": "encrypted_api_key"}
    columns = [renamed.get(name, name) for name in _names(PROJECT_COLUMNS)]
    assert columns == [field.name for field in fields(Project)]


def test_sqlite_parameters_are_numbered_marks_without_casts() -> None:
    template = "SELECT {like} FROM t WHERE ($1::uuid IS NULL OR a = $1) LIMIT $12"
    sqlite_text = Dialect("sqlite", "LIKE", "d", question_marks=True).render(template)
    assert sqlite_text == "SELECT LIKE FROM t WHERE (?1 IS NULL OR a = ?1) LIMIT ?12"
    postgres_text = Dialect("postgres", "ILIKE", "d").render(template)
    assert postgres_text == template.replace("{like}", "ILIKE")


@pytest.mark.parametrize("module", DIALECT_MODULES, ids=["sqlite", "postgres"])
def test_every_shared_statement_is_rendered_whole(module: Any) -> None:
    for field in fields(Statements):
        text = getattr(module.SQL, field.name)
        assert text and "{" not in text and "}" not in text, field.name
        if module is sqlite:
            assert "$" not in text and "::" not in text, field.name


def test_the_backend_runs_only_the_statements_of_its_dialect() -> None:
    """Every database call in backend.py takes `self._sql.<statement>` (or passes on
    the `sql` it was given): no SQL is built there."""
    tree = ast.parse(Path(backend.__file__).read_text())
    sql_arguments = {
        ast.unparse(node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) in BACKEND_CALLS
    }
    allowed = {"sql"} | {f"self._sql.{field.name}" for field in fields(Statements)}
    assert sql_arguments and sql_arguments <= allowed, sql_arguments - allowed
