"""docs/configuration.md agrees with the code: its defaults and its secret settings."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llm_proxy.config import SECRET_SETTINGS, Settings

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"
TOKEN = "0123456789abcdef"
SETTINGS_HEADER = "| variable | default | meaning |"
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| `([^`]*)`")


def documented_defaults() -> list[tuple[str, str]]:
    """(variable, default) of every settings-table row whose default is a value."""
    rows: list[tuple[str, str]] = []
    header = ""
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = ""
        elif not header:
            header = line
        elif header == SETTINGS_HEADER and (match := ROW.match(line)):
            rows.append((match[1], match[2]))
    return rows


def without_given_marks(settings: Settings) -> Settings:
    """Settings without the marks of which variables were set at all."""
    upstream = dataclasses.replace(settings.upstream, base_url_set=False)
    return dataclasses.replace(settings, upstream=upstream)


def test_the_tables_document_defaults() -> None:
    assert len(documented_defaults()) > 40


@pytest.mark.parametrize(("name", "default"), documented_defaults())
def test_a_documented_default_is_the_default(name: str, default: str) -> None:
    unset = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN})
    given = Settings.from_env({"MANAGEMENT_TOKEN": TOKEN, name: default})
    assert without_given_marks(given) == unset


def test_the_secret_files_table_lists_every_secret_setting_and_only_those() -> None:
    row = re.compile(r"^\| `([A-Z0-9_]+)`[^|]*\| `\1_FILE` \|$", re.MULTILINE)
    assert set(row.findall(DOC.read_text(encoding="utf-8"))) == set(SECRET_SETTINGS)
