"""Packaging: every third-party import is declared in pyproject.toml, for its users."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = "llm_proxy"
# A requirement's distribution name and its extras: `llm-proxy[test,e2e]`, `uvloop>=0.19; ...`
REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    """The distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(requirement: str) -> tuple[str, set[str]]:
    """The canonical name and the extras of one requirement string."""
    match = REQUIREMENT.match(requirement)
    assert match is not None, requirement
    extras = {e.strip() for e in (match[2] or "").split(",") if e.strip()}
    return canonical(match[1]), extras


def top_level_imports(folder: Path) -> dict[str, Path]:
    """Each absolute import's top-level name under `folder`, with a file using it."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.py")):
        for name in _imported(ast.parse(path.read_text(), str(path))):
            found.setdefault(name.partition(".")[0], path)
    return found


def _imported(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def declared(requirements: Iterable[str]) -> set[str]:
    """Canonical distribution names of requirement strings (markers and all)."""
    return {parse(line)[0] for line in requirements}


def undeclared(folder: Path, allowed: set[str]) -> dict[str, str]:
    """Third-party imports under `folder` whose distribution is not `allowed`."""
    distributions = packages_distributions()
    missing: dict[str, str] = {}
    for name, path in top_level_imports(folder).items():
        if name in sys.stdlib_module_names or name in (SELF, "tests", "__future__"):
            continue
        providers = {canonical(d) for d in distributions.get(name, [])}
        if not providers & allowed:
            missing[name] = str(path.relative_to(ROOT))
    return missing


def extra(name: str) -> set[str]:
    return declared(PROJECT["optional-dependencies"][name])


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    imports = top_level_imports(ROOT / SELF)
    assert {"aiohttp", "jinja2", "multidict", "yarl", "prometheus_client"} <= set(
        imports
    )
    assert undeclared(ROOT / SELF, declared(PROJECT["dependencies"])) == {}


def test_every_import_of_the_tests_is_declared_in_the_test_extras() -> None:
    allowed = declared(PROJECT["dependencies"]) | extra("test") | extra("e2e")
    assert undeclared(ROOT / "tests", allowed) == {}


def test_end_to_end_clients_are_an_extra_of_their_own_that_dev_includes() -> None:
    assert {"openai", "playwright"} <= extra("e2e")
    assert not extra("e2e") & declared(PROJECT["dependencies"])
    dev = dict(map(parse, PROJECT["optional-dependencies"]["dev"]))
    assert {"test", "e2e"} <= dev["llm-proxy"]


def test_constraints_pin_every_declared_requirement() -> None:
    pins = {
        canonical(line.partition("==")[0])
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    wanted = declared(PROJECT["dependencies"])
    for name in ("test", "e2e", "dev"):
        wanted |= extra(name) - {"llm-proxy"}
    assert wanted - pins == set()
