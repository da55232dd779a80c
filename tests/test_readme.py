"""README's claims that tests keep true: the failure-mode table names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def failure_table() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## When things go wrong", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| what", "|---"))]


def test_every_failure_mode_names_tests_that_exist():
    rows = failure_table()
    assert len(rows) >= 15
    for row in rows:
        cited = row.rsplit("|", 2)[1]
        if cited.strip() == "same test":
            continue
        module = None
        for reference in re.findall(r"`([^`]+)`", cited):
            file, _, name = reference.partition("::")
            module = file or module
            source = (ROOT / "tests" / module).read_text()
            assert name, f"README cites {reference!r} without a test name"
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), (
                f"README cites {module}::{name}, which does not exist"
            )
