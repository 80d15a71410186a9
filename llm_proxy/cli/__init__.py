"""The `llm-proxy` command line (click): serve, server, setup, manage, db, openai, bench.

One module per group of commands; importing them here registers them on `main`.

Settings rule: built-in defaults < `.env` in the working directory < environment <
command-line flags. Flags are mapped onto the environment variable names and passed as
`overrides` to `Settings.from_env`, so there is one parser and one set of messages.
The proxy's secrets (ENCRYPTION_KEY, ADMIN_PASSWORD, upstream keys) are never flags:
they would show in the process list. Client commands take theirs as a flag for one-off
use (`manage --management-token`, `openai chat` / `bench --token`, `dispatcher
--api-key`); each help names the variable to prefer.

Client commands (`manage`, `openai chat`, `bench`, `server health`) find the local
proxy from LISTEN_ADDR (`.env` or environment) unless given a URL.

Exit codes: 0 ok, 1 failure (an API error, a server that is down), 2 usage or
configuration error, 3 `server status` found no running server. Errors are one line on
stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

from . import audit, manage, serving, setup_command, tools  # noqa: F401  (registers commands)
from .base import _as_cli_error, main
from .base import local_url as _local_url
from .daemon import daemon_argv
from .setup_command import prepare_database

__all__ = ["_as_cli_error", "_local_url", "daemon_argv", "main", "prepare_database"]
