"""Files only the proxy's user may read: created 0600, in folders created 0700.

The database, the event log, dead letters and the spool hold usage and, with
LOG_BODIES, prompts and answers. The modes are set explicitly after creation, so the
process's umask neither widens nor narrows them; existing files and folders keep
the modes an operator gave them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Final

PRIVATE_FILE_MODE: Final = 0o600
PRIVATE_DIR_MODE: Final = 0o700
_APPEND: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def make_private_dirs(folder: Path) -> None:
    """Create `folder` and each missing parent with mode 0700."""
    missing = []
    current = folder
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:  # another process or thread was first
            continue
        os.chmod(path, PRIVATE_DIR_MODE)


def _create(path: Path) -> int | None:
    """A descriptor of `path` newly created 0600 for appending; None if it exists."""
    make_private_dirs(path.parent)
    try:
        descriptor = os.open(path, _APPEND | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return None
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def open_private_append(path: Path) -> BinaryIO:
    """`path` opened for binary appending; created 0600 (folders 0700) if missing."""
    descriptor = _create(path)
    if descriptor is None:
        descriptor = os.open(path, _APPEND)
    return os.fdopen(descriptor, "ab")


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 (and its folders 0700) unless it exists."""
    descriptor = _create(path)
    if descriptor is not None:
        os.close(descriptor)
