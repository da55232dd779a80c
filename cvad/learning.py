"""One more product on the line: a saved detector learns the next task (what ``cvad learn`` does).

The detector file holds what the next step needs (the fitted state, the replay buffer, each step's
thresholds, the record so far). The step runs through the protocol's own :class:`Learner` and
``learn_step``, and every source of randomness is seeded per step, so learning a stream one task at a
time gives the matrices and the fitted state ``cvad run`` gives on the whole stream. The source is
never changed: the result is a new run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from cvad.config import DatasetConfig, RunConfig, validate_config
from cvad.continual.calibration import check_holdout
from cvad.continual.protocol import THRESHOLD_MATRICES, Learner, LoaderSettings, StreamResult, learn_step
from cvad.data import open_dataset
from cvad.data.base import CategorySplit, DatasetError, check_split
from cvad.detector import DETECTOR_FORMAT, Detector
from cvad.metrics import METRICS
from cvad.models.components.frozen import FeatureStore
from cvad.progress import Listener, StepDone, ignore
from cvad.record import TrialRecord
from cvad.runtime import resolve_device
from cvad.trial import save_outputs, trial_record


class LearnError(ValueError):
    """A detector that cannot learn this task; the message says why and what to do instead."""


@dataclass
class Learned:
    """A task learned: the new run folder and record, and which earlier tasks could be evaluated."""

    out: Path
    record: TrialRecord
    task: str
    not_evaluated: list[str]


def check_learnable(detector: Detector, task: str, where: str) -> TrialRecord:
    """Refuse a detector that cannot take ``task``; returns the record of its stream so far."""
    if detector.format != DETECTOR_FORMAT or detector.record is None:
        raise LearnError(
            f"{where} is a {detector.format} file: it keeps no replay buffer, thresholds or record of its stream, so "
            "it cannot learn another task; run its stream again with `cvad run` (its detectors can)"
        )
    if detector.config.strategy.name == "joint":
        raise LearnError(
            f"{where} was trained jointly (strategy joint learns every task at once, with no step to continue); to "
            f"add {task}, run the whole stream again with `cvad run --set dataset.tasks=[...,{task}]`, or train with "
            "strategy finetune or replay, whose detectors learn one task at a time"
        )
    if task in detector.tasks:
        raise LearnError(f"{where} has already learned {task} (its tasks: {', '.join(detector.tasks)}); name a new one")
    return detector.record


def next_config(config: RunConfig, tasks: list[str], task: str) -> RunConfig:
    """The config ``cvad run`` would be given for the stream ``tasks`` + ``task``."""
    dataset = config.dataset.model_dump(mode="json")
    if config.dataset.name == "builtin":
        from cvad.data.builtin import BUILTIN_CATEGORIES

        if task not in BUILTIN_CATEGORIES:
            raise LearnError(f"{task!r} is not a built-in category; choose one of: {', '.join(BUILTIN_CATEGORIES)}")
        builtin = dataset["builtin"]
        if isinstance(builtin["train_per_category"], dict):
            raise LearnError(
                "dataset.builtin.train_per_category gives a count per category, none for "
                f"{task}; learn it from a config with one count for every category"
            )
        if task not in builtin["categories"]:
            builtin["categories"] = [*builtin["categories"], task]
    if dataset["tasks"] != "all" or config.dataset.name != "builtin":
        dataset["tasks"] = [*tasks, task]
    return validate_config(config.to_dict() | {"dataset": dataset})


def load_split(dataset: DatasetConfig, name: str, root: str | None = None) -> CategorySplit:
    """One task's images, checked; from ``root`` where it is not the dataset's own folder."""
    if root is not None:
        dataset = dataset.model_copy(update={"root": Path(root)})
    split = open_dataset(dataset).load(name)
    check_split(split)
    return split


def extended(record: TrialRecord, task: str) -> StreamResult:
    """The record's stream with room for one more task: every matrix gains a column and a row."""
    size = len(record.tasks) + 1

    def grow(matrix: list[list[float | None]] | None) -> list[list[float | None]]:
        rows = [list(row) + [None] for row in matrix] if matrix else [[None] * size for _ in range(size - 1)]
        return rows + [[None] * size]

    thresholds = (record.thresholds or {}).get("matrices", {})
    return StreamResult(
        [*record.tasks, task],
        {metric: grow(record.matrices.get(metric)) for metric in METRICS},
        {name: grow(thresholds.get(name)) for name in THRESHOLD_MATRICES},
        list(record.steps),
    )


def learn_task(
    detector: Detector,
    task: str,
    out: Path,
    *,
    root: Path | None = None,
    where: str = "the detector",
    progress: Listener = ignore,
    say=print,
) -> Learned:
    """Fit ``task`` on ``detector`` with its method's continual rule and its strategy, calibrate, evaluate every task
    seen whose test data is here, and write the new run folder ``out``."""
    started = time.perf_counter()
    record = check_learnable(detector, task, where)
    config = next_config(detector.config, detector.tasks, task)
    own_root = None if config.dataset.root is None else str(config.dataset.root)
    if root is not None and config.dataset.name == "builtin":
        raise LearnError(
            "--root names a dataset folder; the built-in data is generated (its categories: see cvad list)"
        )
    new_root = str(root) if root is not None and str(root) != own_root else None
    new_split = load_split(config.dataset, task, new_root)
    check_holdout([new_split], config.calibration)
    roots = {step.trained_on: step.data_root for step in record.steps}
    seen: list[CategorySplit | None] = []
    not_evaluated = []
    for name in detector.tasks:
        try:
            seen.append(load_split(config.dataset, name, roots.get(name)))
        except DatasetError as exc:  # an earlier product whose test images are not on this machine
            seen.append(None)
            not_evaluated.append(name)
            say(f"  {name}: not evaluated ({exc})")
    data_seconds = time.perf_counter() - started

    device = resolve_device(config.device)
    settings = LoaderSettings.of(config, device)
    learner = Learner(
        detector.model.to(device), config.strategy.name, settings, config.calibration, detector.replay,
        detector.thresholds, FeatureStore(), progress,
    )  # fmt: skip
    stream = extended(record, task)
    row = len(detector.tasks)
    learned_at = time.perf_counter()
    step = learn_step(learner, row, [new_split], [*seen, new_split], stream)
    if new_root is not None:
        stream.steps[-1] = replace(step, data_root=new_root)
    progress(StepDone(row, row + 1, stream.tasks, stream.steps[-1], stream.matrices))
    earlier = record.wall_seconds
    wall = {
        "data": earlier.get("data", 0.0) + data_seconds,
        "protocol": earlier.get("protocol", 0.0) + time.perf_counter() - learned_at,
        "train": sum(s.train_seconds for s in stream.steps),
        "eval": sum(s.eval_seconds for s in stream.steps),
        "total": earlier.get("total", 0.0) + time.perf_counter() - started,
    }
    new_record = trial_record(config, learner, stream, device, wall)
    # Overlays of the task learned only: the earlier tasks' cost a forward each and are in the source folders.
    new_record = save_outputs(Path(out), new_record, learner, config, [new_split], keep_detector=True)
    return Learned(Path(out), new_record, task, not_evaluated)
