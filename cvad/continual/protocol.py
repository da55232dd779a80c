"""The class-incremental protocol (docs/methods.md section 1).

Tasks arrive in order; a strategy decides what the method trains on at each step;
after each step the method is evaluated on every task seen so far, filling the
task x task matrices R[t][j] (metric on task j after step t; None where j was not
yet seen or not evaluated). A :class:`Learner` takes one step at a time and keeps what
the next step needs (the model, the replay buffer, the thresholds), so ``cvad run`` loops
over it and ``cvad learn`` continues a saved one with the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import ConcatDataset, DataLoader

from cvad.config import CalibrationConfig, RunConfig
from cvad.continual.calibration import Thresholds, ThresholdSet, calibrate, holdout_split
from cvad.continual.replay import ReplayBuffer
from cvad.data.base import CategorySplit, ImageDataset, Sample
from cvad.decision import DecisionRule
from cvad.efficiency import memory_footprint
from cvad.efficiency.peak import peak_rise
from cvad.metrics import METRICS, ImageMetrics, PixelMetrics, ThresholdCounts
from cvad.models.base import AnomalyModel, ImageBatches, Task
from cvad.models.components.frozen import FeatureStore
from cvad.progress import Listener, StepDone, TaskEvaluated, TrainStarted, ignore
from cvad.record import StepRecord
from cvad.region_overlap import RegionOverlap
from cvad.runtime import step_seed

StrategyName = Literal["finetune", "replay", "joint"]
THRESHOLD_MATRICES = ("image_threshold", "pixel_threshold")  # R[t][j]: task j's held-out thresholds after step t


@dataclass(frozen=True)
class LoaderSettings:
    image_size: int
    batch_size: int
    device: str
    seed: int
    eval_batch_size: int

    @classmethod
    def of(cls, config: RunConfig, device: str) -> LoaderSettings:
        """A run config's loading settings on ``device``."""
        data = config.dataset
        return cls(data.image_size, data.batch_size, device, config.seed, data.eval_batch_size)


def train_batches(dataset, settings: LoaderSettings, step: int) -> ImageBatches:
    """Shuffled (seeded per step) batches of a task's training images."""
    generator = torch.Generator().manual_seed(settings.seed * 1000 + step)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    return ImageBatches(loader, settings.device)


def empty_matrices(names: tuple[str, ...], tasks: int) -> dict[str, list[list[float | None]]]:
    return {name: [[None] * tasks for _ in range(tasks)] for name in names}


@dataclass
class Learner:
    """A method learning a stream under a strategy, one step at a time.

    ``replay`` is the strategy's buffer (replay only); ``thresholds`` grow by one entry per step
    when calibration is on.
    """

    model: AnomalyModel
    strategy: StrategyName
    settings: LoaderSettings
    calibration: CalibrationConfig
    replay: ReplayBuffer | None = None
    thresholds: ThresholdSet = field(default_factory=ThresholdSet)
    features: FeatureStore = field(default_factory=FeatureStore)
    progress: Listener = ignore

    @property
    def decides(self) -> bool:
        return bool(self.thresholds.steps)

    def decision_rule(self) -> DecisionRule | None:
        return DecisionRule(self.thresholds).to(self.settings.device) if self.decides else None

    def learn(self, step: int, splits: list[CategorySplit]) -> StepRecord:
        """Train step ``step`` on ``splits`` (one task; every task for a joint step), then calibrate its thresholds.

        The update (fitting, rebalancing the buffer, calibrating) is timed and its peak memory measured.
        """
        parts = [holdout_split(split, self.calibration, self.settings.seed) for split in splits]
        train_sets = [ImageDataset(train, self.settings.image_size) for train, _ in parts]
        dataset = ConcatDataset(train_sets)
        if self.replay is not None and len(self.replay):
            dataset = ConcatDataset([dataset, self.replay])
        label = "+".join(split.name for split in splits)
        self.progress(TrainStarted(step, label, len(dataset)))
        torch.manual_seed(step_seed(self.settings.seed, step))  # what a method draws from the global generator
        with peak_rise() as cost:
            batches = train_batches(dataset, self.settings, step)
            task = Task(step, label, batches, report=self.progress, tasks_covered=len(splits), features=self.features)
            self.model.fit_task(task)
            if self.replay is not None:
                self.replay.add_task(train_sets[0])
            held_out = [sample for _, held in parts for sample in held]
            if held_out:
                self.thresholds.steps.append(self.calibrate(held_out))
        return StepRecord(
            step=step,
            trained_on=label,
            train_images=len(dataset),
            train_seconds=cost.seconds,
            eval_seconds=0.0,
            replay_per_task=self.replay.counts() if self.replay is not None else None,
            held_out_images=len(held_out),
            update_peak_mb=cost.rise_bytes / 2**20,
            update_state_mb=self.update_state_bytes(train_sets) / 2**20,
        )

    def update_state_bytes(self, train_sets: list[ImageDataset]) -> int:
        """Bytes an update holds besides activations (from tensors): the model's stored state, the replay buffer
        and the step's training images at input size, as uint8."""
        parts = self.model.stored_tensors()
        if self.replay is not None:
            parts["replay_buffer"] = list(self.replay.stored)
        size = self.settings.image_size
        images = sum(len(s) for s in train_sets) * 3 * size * size
        return memory_footprint(parts).total_bytes + images

    def calibrate(self, samples: list[Sample]) -> Thresholds:
        s = self.settings
        return calibrate(self.model, samples, s.image_size, s.eval_batch_size, s.device, self.calibration)

    def recalibrated(self, split: CategorySplit) -> Thresholds | None:
        """The thresholds ``split``'s held-out images give under the model as it is now (how thresholds drift)."""
        _, held_out = holdout_split(split, self.calibration, self.settings.seed)
        return self.calibrate(held_out) if held_out else None

    @torch.inference_mode()
    def evaluate(self, split: CategorySplit, task_index: int | None = None) -> dict[str, float | None]:
        """Every metric of ``METRICS`` on one task's test set; pixel ones None without masks, calibrated ones None
        without thresholds. With ``task_index``, a method that routes images to tasks also gets
        ``routing_accuracy``."""
        s = self.settings
        loader = DataLoader(ImageDataset(split.test, s.image_size), batch_size=s.eval_batch_size)
        image_metrics, pixel_metrics, regions = ImageMetrics(), PixelMetrics(), RegionOverlap()
        decided = ThresholdCounts()
        rule = self.decision_rule()
        self.model.eval()
        routed_right = routed = 0
        for batch in loader:
            images = batch["image"].to(s.device).float().div_(255.0)
            output = self.model(images)
            image_metrics.update(output.image_scores.cpu(), batch["label"])
            if split.has_masks:
                pixel_metrics.update(output.anomaly_maps.cpu(), batch["mask"])
                regions.update(output.anomaly_maps.cpu(), batch["mask"])
            if rule is not None:
                defect, mask = rule(output)
                decided.update(defect.cpu(), batch["label"], mask.cpu() if split.has_masks else None, batch["mask"])
            if task_index is not None and output.routed_tasks is not None:
                routed_right += int((output.routed_tasks.cpu() == task_index).sum())
                routed += len(images)
        result = image_metrics.compute()
        if split.has_masks:
            result |= pixel_metrics.compute() | regions.compute()
        result |= decided.compute()
        result["routing_accuracy"] = routed_right / routed if routed else None
        return {metric: result.get(metric) for metric in METRICS}


@dataclass
class StreamResult:
    """A stream learned: every metric's matrix, each step's record, and the threshold matrices."""

    tasks: list[str]
    matrices: dict[str, list[list[float | None]]]
    thresholds: dict[str, list[list[float | None]]]  # THRESHOLD_MATRICES
    steps: list[StepRecord] = field(default_factory=list)


def learn_step(
    learner: Learner, row: int, trained: list[CategorySplit], seen: list[CategorySplit | None], result: StreamResult
) -> StepRecord:
    """One step of the protocol: learn ``trained``, then evaluate every task seen so far (``seen[j]`` None: its
    data is not here, so R[row][j] stays None) and measure how each task's thresholds moved."""
    record = learner.learn(row, trained)
    started = time.perf_counter()
    joint = learner.strategy == "joint"
    for j, split in enumerate(seen):
        if split is None:
            continue
        # A joint step learns all tasks as one, so there is no task identity to route to.
        scores = learner.evaluate(split, task_index=None if joint else j)
        for metric in METRICS:
            result.matrices[metric][row][j] = scores[metric]
        learner.progress(TaskEvaluated(row, split.name, scores))
        now = learner.recalibrated(split) if learner.decides else None
        if now is not None:
            result.thresholds["image_threshold"][row][j] = now.image
            result.thresholds["pixel_threshold"][row][j] = now.pixel
    record = record.with_eval_seconds(time.perf_counter() - started)
    result.steps.append(record)
    return record


def run_continual(learner: Learner, splits: list[CategorySplit]) -> StreamResult:
    """Train ``learner`` along the stream and evaluate after each step."""
    names = [s.name for s in splits]
    T = len(splits)
    result = StreamResult(names, empty_matrices(METRICS, T), empty_matrices(THRESHOLD_MATRICES, T))
    # A joint step trains once on every task and is recorded as the last row.
    steps = [(T - 1, list(range(T)))] if learner.strategy == "joint" else [(t, [t]) for t in range(T)]
    for row, task_ids in steps:
        record = learn_step(learner, row, [splits[i] for i in task_ids], splits[: row + 1], result)
        learner.progress(StepDone(row, len(steps), names, record, result.matrices))
    return result
