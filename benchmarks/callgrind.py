"""A process under valgrind's callgrind whose instruction counters are zeroed and
dumped on demand (`callgrind_control`): counts that a loaded machine does not blur.
Used by callgrind_metrics.py and instructions.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class Callgrind:
    """A child process under callgrind, zeroed and dumped on demand."""

    def __init__(
        self, out: Path, command: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.out = out
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
            + [f"--callgrind-out-file={out}.%p", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out.with_suffix(".log").open("wb"),
            env={**os.environ, **(env or {})},
            # Not a checkout: `python -m` puts the working folder first on the path,
            # ahead of PYTHONPATH, which picks the code of a `--before` tree.
            cwd=out.parent,
            text=True,
        )
        self.dumps = 0

    def zero(self) -> None:
        self._control("--zero")

    def dump(self) -> int:
        """Main-thread instructions since the last zero."""
        self._control("--dump")
        self.dumps += 1
        part = Path(f"{self.out}.{self.process.pid}.{self.dumps}-01")
        for line in part.read_text().splitlines():
            if line.startswith("summary:"):
                return int(line.split()[1])
        raise RuntimeError(f"no summary in {part}")

    def _control(self, what: str) -> None:
        pid = str(self.process.pid)
        subprocess.run(
            ["callgrind_control", what, pid], check=True, capture_output=True
        )
