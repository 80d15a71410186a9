"""`llm-proxy setup`: a `.env` with fresh secrets, the database, a first project and token."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import click

from ..app import master_key
from ..auth.crypto import KeyCipher, TokenHasher
from ..auth.tokens import TokenStore
from ..config import (
    DEFAULT_DATABASE_URL,
    Settings,
)
from ..management.service import (
    ManagementService,
    NewToken,
    check_encryption_key,
)
from ..storage import create_repository
from .base import (
    fail,
    main,
    run,
    upstream_key,
)

# -- setup ---------------------------------------------------------------------------


@main.command()
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(".env"),
    show_default=True,
    help="Where to write the settings.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing env file.")
@click.option(
    "--non-interactive", is_flag=True, help="Take every value from flags; no prompts."
)
@click.option("--listen-addr", default="127.0.0.1:8080", show_default=True)
@click.option("--database-url", default=DEFAULT_DATABASE_URL, show_default=True)
@click.option("--openai-api-url", default="https://api.openai.com", show_default=True)
@click.option(
    "--project",
    help="Create a first project with this name (upstream key from OPENAI_API_KEY "
    "or a hidden prompt).",
)
@click.option(
    "--token-minutes",
    type=click.IntRange(1),
    default=24 * 60,
    show_default=True,
    help="Lifetime of the first token.",
)
def setup(
    env_file: Path,
    force: bool,
    non_interactive: bool,
    listen_addr: str,
    database_url: str,
    openai_api_url: str,
    project: str | None,
    token_minutes: int,
) -> None:
    """Write a .env, create the database, optionally a first project and token."""
    if env_file.exists() and not force:
        fail(f"{env_file} exists; use --force to overwrite it", 2)
    if not non_interactive:
        listen_addr = click.prompt("Listen address", default=listen_addr)
        database_url = click.prompt("Database URL", default=database_url)
        openai_api_url = click.prompt("Upstream API URL", default=openai_api_url)
        project = (
            click.prompt(
                "First project name (empty: none)",
                default=project or "",
                show_default=False,
            ).strip()
            or None
        )
    api_key = None
    if project:
        api_key = upstream_key(non_interactive)
    values = {
        "MANAGEMENT_TOKEN": secrets.token_urlsafe(32),
        "ENCRYPTION_KEY": base64.b64encode(os.urandom(32)).decode(),
        "LISTEN_ADDR": listen_addr,
        "DATABASE_URL": database_url,
        "OPENAI_API_URL": openai_api_url,
    }
    Settings.from_env(values)  # validate before writing anything
    write_env_file(env_file, values)
    click.echo(f"wrote {env_file} (mode 0600)")
    created = run(
        prepare_database(Settings.from_env(values), project, api_key, token_minutes)
    )
    click.echo(f"database ready: {database_url}")
    if created is not None:
        click.echo(f"project {project!r} created: {created.token.project_id}")
        click.echo(f"token (shown once, valid {token_minutes} min): {created.value}")
    _warn_overridden(values)
    click.echo("next: llm-proxy serve")


async def prepare_database(
    settings: Settings, project: str | None, api_key: str | None, token_minutes: int
) -> NewToken | None:
    """Create and migrate the database; with a project name, a project and a token."""
    key = master_key(settings)
    repository = create_repository(settings.database_url)
    await repository.connect()
    try:
        await repository.migrate()
        cipher = KeyCipher(key)
        await check_encryption_key(repository, cipher)
        if project is None or api_key is None:
            return None
        hasher = TokenHasher(key)
        service = ManagementService(
            repository, cipher, hasher, TokenStore(hasher, cipher)
        )
        created = await service.create_project(name=project, api_key=api_key)
        return await service.create_token(
            project_id=created.id, duration_minutes=token_minutes
        )
    finally:
        await repository.close()


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """Write KEY=VALUE lines with mode 0600 from the first byte."""
    text = "# written by `llm-proxy setup`; keep it secret\n" + "".join(
        f"{key}={value}\n" for key, value in values.items()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def _warn_overridden(values: Mapping[str, str]) -> None:
    shadowed = sorted(name for name in values if name in os.environ)
    if shadowed:
        click.secho(
            "note: set in the environment, which wins over the env file: "
            + ", ".join(shadowed),
            fg="yellow",
            err=True,
        )
