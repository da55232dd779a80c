"""What Ray workers send the driver while a trial runs, through a queue kept on the driver's node.

Plain data, free of torch, so that the driver reads them without importing the trial code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrialStarted:
    """What a worker sends the driver when an attempt at trial ``number`` begins: a second one from another
    worker means Ray reran the trial after losing the first one's node."""

    number: int
    worker: str  # Ray node:pid


@dataclass(frozen=True)
class StepReport:
    """What a worker sends the driver after step ``step`` of trial ``number``: that step's row of
    every metric's matrix."""

    number: int
    step: int
    tasks: list[str]
    rows: dict[str, list[float | None]]
    worker: str  # Ray node:pid


def send(events: Any, report: TrialStarted | StepReport) -> None:
    """Put ``report`` on the driver's channel; progress is best effort (the driver backfills lost steps from the
    record), so a lost channel never fails a trial."""
    try:
        events.put(report)
    except Exception:
        pass
