"""The one entry point: `python -m kdexp.train` (or `kdexp-train`) trains a teacher, a baseline or
a distilled student, depending only on the composed config (the task: kdexp/task.py).

`--help` is answered from the config tree's files alone (kdexp/usage.py): the task's imports (torch,
the schemas) take seconds, and a help page should not."""
from __future__ import annotations

import sys
from pathlib import Path

from kdexp import usage

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
HELP_FLAGS = ("--help", "-h")


def cli() -> None:
    """`python -m kdexp.train` / `kdexp-train`."""
    if any(flag in sys.argv[1:] for flag in HELP_FLAGS):
        usage.print_help(Path(CONFIG_DIR))
        return
    from kdexp import task  # torch, the networks, the methods: what --help goes without

    task.start()


if __name__ == "__main__":
    cli()
