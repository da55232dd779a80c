"""Typed progress events: what a run reports while it works, and who listens.

The continual protocol and the shared training loop emit these; ``cvad run`` prints them,
a sweep's worker forwards :class:`StepDone` to the driver. A listener is any callable taking
one event (``Progress``); it matches on the class, never on strings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataReady:
    """The dataset is listed (or generated); ``message`` says what was found."""

    message: str


@dataclass(frozen=True)
class TrainStarted:
    """Stream step ``step`` (0-based) starts training on ``task`` with ``images`` images (replay included)."""

    step: int
    task: str
    images: int


@dataclass(frozen=True)
class TrainPass:
    """A trained method finished pass ``number`` of ``passes`` over its step's batches."""

    step: int
    number: int
    passes: int
    loss: float


@dataclass(frozen=True)
class TaskEvaluated:
    """After step ``step``, the metrics on the test set of ``task``."""

    step: int
    task: str
    metrics: dict[str, float | None]


@dataclass(frozen=True)
class StepDone:
    """Step ``step`` of ``steps`` is trained and evaluated; ``matrices`` hold every metric's T x T matrix so far."""

    step: int
    steps: int
    tasks: list[str]
    record: Any  # cvad.record.StepRecord
    matrices: dict[str, list[list[float | None]]]


Progress = DataReady | TrainStarted | TrainPass | TaskEvaluated | StepDone
Listener = Callable[[Progress], None]


def ignore(event: Progress) -> None:
    """The listener of a run nobody watches."""
