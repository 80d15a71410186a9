"""The Dockerfile passes hadolint with no finding at all (warnings included)."""

from __future__ import annotations

from .tools import ROOT, run, tool


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = run(tool("hadolint"), "--no-color", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
