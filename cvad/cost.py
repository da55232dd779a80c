"""What a configuration costs on the device: memory by part and GFLOPs per image.

``measure_efficiency`` is what every run records, read off the fitted model's real tensors
and a trace of its inference path. ``price_config`` measures a configuration the same way
without data or training: it builds the model, gives it placeholder state of the shapes it
would store after N tasks (banks, Gaussians, prototypes, see ``AnomalyModel.shape_as_fitted``)
and a replay buffer of R images, so a sweep can refuse a configuration that breaks its budget
before training it and a recommendation can be projected to more tasks. Both return the
same ``efficiency`` section of the result record (layout in README, "The result record").
"""

from __future__ import annotations

import warnings

import torch

from cvad.backbones.weights import RandomWeightsWarning
from cvad.config import DatasetConfig, RunConfig
from cvad.continual.calibration import Thresholds, ThresholdSet
from cvad.decision import DecisionRule
from cvad.efficiency import count_gflops, memory_footprint
from cvad.models import AnomalyModel, build_model


def measure_efficiency(
    model: AnomalyModel,
    image_size: int,
    device: str,
    replay: list[torch.Tensor] | None,
    rule: DecisionRule | None = None,
) -> dict:
    """Memory (MB = 2^20 bytes, bytes kept) by part and GFLOPs (2 x GMACs, GMACs kept) of a model, with what the
    device keeps besides it: the replay buffer's stored images (``ReplayBuffer.stored``), and the thresholds it
    decides with."""
    parts = model.stored_tensors()
    if replay is not None:
        parts["replay_buffer"] = replay
    if rule is not None:
        parts["thresholds"] = rule.stored()
    memory = memory_footprint(parts)
    flops = count_gflops(model, image_size, device=device)
    return {
        "memory_mb": memory.total_mb,
        "memory_bytes": memory.total_bytes,
        "memory_breakdown_mb": memory.breakdown_mb,
        "memory_bytes_by_part": memory.bytes_by_part,
        "gflops": flops.gflops,
        "gmacs": flops.gmacs,
        "gmacs_by_operator": flops.by_operator,
        "uncounted_ops": flops.uncounted_ops,
    }


def task_count(dataset: DatasetConfig) -> int:
    """How many tasks a dataset config streams, from the config alone where it says (a list, a preset,
    the built-in set)."""
    declared = dataset.declared_task_count()
    if declared is not None:
        return declared
    if dataset.root is None or not dataset.root.is_dir():
        raise ValueError(
            f"dataset.tasks is 'all' and the folder {dataset.root} is not here to count its categories; "
            "give the number of tasks (--tasks N) or list them in dataset.tasks"
        )
    from cvad.data import open_dataset

    return len(open_dataset(dataset).categories())


def price_config(config: RunConfig, tasks: int | None = None) -> dict:
    """The ``efficiency`` a run of ``config`` would record after ``tasks`` tasks (default: its stream's length).

    Values of weights and state do not change the price, so the backbone is built untrained
    (no weights are loaded or downloaded). Assumes every task has enough training images to
    fill its share of a bank and the replay buffer.
    """
    tasks = task_count(config.dataset) if tasks is None else tasks
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1, got {tasks}")
    size = config.dataset.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(config.model.name, config.model.params, config.setup(weights="random", tasks=tasks))
    model.eval()
    model.shape_as_fitted(tasks)
    replay = None
    if config.strategy.name == "replay":  # JPEG images too are priced at their raw size: their bytes depend on them
        replay = [torch.empty(config.strategy.replay_size, 3, size, size, dtype=torch.uint8)]
    rule = None
    if config.calibration.enabled:  # one image and one pixel threshold per step
        steps = 1 if config.strategy.name == "joint" else tasks
        rule = DecisionRule(ThresholdSet([Thresholds(0.0, 0.0)] * steps))
    priced = {"tasks": tasks}
    if config.compression.replay == "jpeg":
        priced["replay_priced_raw"] = True
    return measure_efficiency(model, size, "cpu", replay, rule) | priced
