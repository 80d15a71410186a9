"""What the deployment tests share: the repository's paths, its tools, settings checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from llm_proxy.config import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
# Stand-ins for the values the *_FILE settings read from mounted secrets.
SECRET_VALUES = {
    "MANAGEMENT_TOKEN": "a-management-token-of-the-test",
    "ENCRYPTION_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
}


def tool(name: str) -> str:
    """The path of a command-line tool; missing, a failure in CI, a skip elsewhere.

    .ci/run installs every one of them (docker-compose, helm, hadolint, nginx).
    """
    found = shutil.which(name) or shutil.which(name, path=f"{VENV_BIN}:/usr/sbin")
    if found is None:
        reason = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a tool with a clean environment (no settings of the caller leak in)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": tempfile.gettempdir()}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def proxy_settings(environment: Mapping[str, str], secrets_dir: Path) -> Settings:
    """The settings a container with this environment would start with.

    Each `NAME_FILE` of the secrets points at a mounted file in the container; here it
    points at a file in `secrets_dir` holding a stand-in value, which the proxy's own
    reader then reads, as it would the mounted one. The rest is validated as written.
    """
    env = dict(environment)
    for name, value in SECRET_VALUES.items():
        if f"{name}_FILE" in env:
            path = secrets_dir / name.lower()
            path.write_text(value + "\n")
            path.chmod(0o440)  # as the chart mounts them: owner and group read
            env[f"{name}_FILE"] = str(path)
    return Settings.from_env(env)
