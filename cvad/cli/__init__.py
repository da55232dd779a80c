"""The ``cvad`` command line: a thin adapter that prints progress and writes records.

One module per job (``run``, ``learn``, ``sweep``, ``choose``, ``deploy``), each adding its commands to the one
Typer app in ``common``. Module-level imports stay light (no torch, timm, Ray, Optuna or models):
`cvad --help` and `cvad recommend` must start at once; each command imports what it needs
(tests/test_cli_startup.py).
"""

from __future__ import annotations

import sys

from cvad.cli import choose, deploy, learn, run, sweep  # noqa: F401  (each adds its commands to ``cli``)
from cvad.cli.common import cli

__all__ = ["app", "cli", "expand_set_values"]


def expand_set_values(argv: list[str]) -> list[str]:
    """Let ``--set a=1 b=2`` mean ``--set a=1 --set b=2``."""
    expanded, in_set = [], False
    for token in argv:
        if token == "--set":
            in_set = True
            expanded.append(token)
            continue
        if in_set and not token.startswith("-") and "=" in token and expanded[-1] != "--set":
            expanded.append("--set")
        in_set = in_set and not token.startswith("-")
        expanded.append(token)
    return expanded


def app() -> None:
    """Console-script entry point."""
    cli(args=expand_set_values(sys.argv[1:]), prog_name="cvad")
