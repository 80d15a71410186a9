"""deploy/compose-secrets.sh: the Docker secrets of docker-compose.yml, made once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from llm_proxy.config.values import MIN_MANAGEMENT_TOKEN_CHARS, parse_encryption_key

from .tools import ROOT, run, tool

SCRIPT = ROOT / "deploy/compose-secrets.sh"
NAMES = {"management_token", "encryption_key", "postgres_password", "pgpass"}
PROXY_UID = 10001


def _make(folder: Path) -> dict[str, str]:
    result = run(tool("bash"), str(SCRIPT), str(folder), cwd=folder.parent)
    assert result.returncode == 0, result.stderr
    return {path.name: path.read_text() for path in folder.iterdir()}


def test_secrets_are_valid_private_and_the_password_matches(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    secrets = _make(folder)
    assert set(secrets) == NAMES
    assert parse_encryption_key(secrets["encryption_key"].strip()) is not None
    assert len(secrets["management_token"].strip()) >= MIN_MANAGEMENT_TOKEN_CHARS
    password = secrets["postgres_password"].strip()
    assert secrets["pgpass"] == f"postgres:5432:llmproxy:llmproxy:{password}\n"
    for name in NAMES:
        info = (folder / name).stat()
        # asyncpg ignores a password file that its group or others may read
        assert stat.S_IMODE(info.st_mode) == 0o600, name
        proxy_reads = name != "postgres_password"
        if os.geteuid() == 0:
            assert (info.st_uid == PROXY_UID) == proxy_reads, name


def test_existing_secrets_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    first = _make(folder)
    (folder / "pgpass").unlink()
    assert _make(folder) == first, "the key that decrypts the database stays"
