"""Locating the data directories (`sql/`, `static/`) in a wheel or a source checkout."""

from __future__ import annotations

from pathlib import Path

import llm_proxy


def data_dir(name: str) -> Path:
    """Directory `name`: inside the installed package, else at the checkout's top level.

    The wheel maps the top-level `sql/` and `static/` into the package (see
    pyproject.toml), so an installed package finds them next to its modules; a source
    checkout keeps them beside the package directory.
    """
    package_dir = Path(llm_proxy.__file__).resolve().parent
    candidates = (package_dir / name, package_dir.parent / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(path) for path in candidates)
    raise FileNotFoundError(f"data directory {name!r} not found (looked in {looked})")
