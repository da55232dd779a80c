"""The class-incremental protocol (docs/methods.md section 1).

Tasks arrive in order; a strategy decides what the method trains on at each step;
after each step the method is evaluated on every task seen so far, filling the
task x task matrices R[t][j] (metric on task j after step t; None where j was not
yet seen or not evaluated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import ConcatDataset, DataLoader

from cvad.continual.replay import ReplayBuffer
from cvad.data.base import CategorySplit, ImageDataset
from cvad.metrics import METRICS, ImageMetrics, PixelMetrics
from cvad.models.base import AnomalyModel, ImageBatches, Task
from cvad.models.components.frozen import FeatureStore
from cvad.progress import Listener, StepDone, TaskEvaluated, TrainStarted, ignore
from cvad.record import StepRecord

StrategyName = Literal["finetune", "replay", "joint"]


@dataclass
class ProtocolResult:
    tasks: list[str]
    matrices: dict[str, list[list[float | None]]]
    steps: list[StepRecord] = field(default_factory=list)
    replay: ReplayBuffer | None = None


@dataclass(frozen=True)
class LoaderSettings:
    image_size: int
    batch_size: int
    device: str
    seed: int
    eval_batch_size: int


def train_batches(dataset, settings: LoaderSettings, step: int) -> ImageBatches:
    """Shuffled (seeded per step) batches of a task's training images."""
    generator = torch.Generator().manual_seed(settings.seed * 1000 + step)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    return ImageBatches(loader, settings.device)


@torch.inference_mode()
def evaluate(
    model: AnomalyModel, split: CategorySplit, settings: LoaderSettings, task_index: int | None = None
) -> dict[str, float | None]:
    """Image and pixel metrics of ``model`` on one task's test set; pixel ones None without masks.

    With ``task_index``, a method that routes images to tasks also gets ``routing_accuracy``.
    """
    loader = DataLoader(ImageDataset(split.test, settings.image_size), batch_size=settings.eval_batch_size)
    image_metrics, pixel_metrics = ImageMetrics(), PixelMetrics()
    model.eval()
    routed_right = routed = 0
    for batch in loader:
        images = batch["image"].to(settings.device).float().div_(255.0)
        output = model(images)
        image_metrics.update(output.image_scores.cpu(), batch["label"])
        if split.has_masks:
            pixel_metrics.update(output.anomaly_maps.cpu(), batch["mask"])
        if task_index is not None and output.routed_tasks is not None:
            routed_right += int((output.routed_tasks.cpu() == task_index).sum())
            routed += len(images)
    result = image_metrics.compute()
    result.update(pixel_metrics.compute() if split.has_masks else {"pixel_f1": None, "pixel_auroc": None})
    result["routing_accuracy"] = routed_right / routed if routed else None
    return result


def run_continual(
    model: AnomalyModel,
    splits: list[CategorySplit],
    *,
    strategy: StrategyName,
    settings: LoaderSettings,
    replay_size: int | None = None,
    progress: Listener = ignore,
    features: FeatureStore | None = None,
) -> ProtocolResult:
    """Train ``model`` along the stream under ``strategy`` and evaluate after each step.

    ``features`` keeps frozen networks' outputs per training image across the steps (default:
    a store of this run's alone).
    """
    features = features or FeatureStore()
    names = [s.name for s in splits]
    T = len(splits)
    matrices = {m: [[None] * T for _ in range(T)] for m in METRICS}
    result = ProtocolResult(tasks=names, matrices=matrices)
    train_sets = [ImageDataset(s.train, settings.image_size) for s in splits]
    if strategy == "replay":
        if not replay_size:
            raise ValueError("strategy 'replay' needs replay_size >= 1")
        result.replay = ReplayBuffer(replay_size, settings.image_size, settings.seed)

    # A joint step trains once on every task and is recorded as the last row.
    steps = [(T - 1, list(range(T)))] if strategy == "joint" else [(t, [t]) for t in range(T)]
    for row, task_ids in steps:
        dataset = ConcatDataset([train_sets[i] for i in task_ids])
        if result.replay is not None and len(result.replay):
            dataset = ConcatDataset([dataset, result.replay])
        label = "+".join(names[i] for i in task_ids)
        progress(TrainStarted(row, label, len(dataset)))
        started = time.perf_counter()
        batches = train_batches(dataset, settings, row)
        model.fit_task(Task(row, label, batches, report=progress, tasks_covered=len(task_ids), features=features))
        trained = time.perf_counter() - started
        if result.replay is not None:
            result.replay.add_task(train_sets[row])

        started = time.perf_counter()
        for j in range(row + 1):
            # A joint step learns all tasks as one, so there is no task identity to route to.
            scores = evaluate(model, splits[j], settings, task_index=None if strategy == "joint" else j)
            for metric in METRICS:
                matrices[metric][row][j] = scores[metric]
            progress(TaskEvaluated(row, names[j], scores))
        record = StepRecord(
            step=row,
            trained_on=label,
            train_images=len(dataset),
            train_seconds=trained,
            eval_seconds=time.perf_counter() - started,
            replay_per_task=result.replay.counts() if result.replay is not None else None,
        )
        result.steps.append(record)
        progress(StepDone(row, len(steps), names, record, matrices))
    return result
