"""Shared training glue for the methods that learn weights (STFPM, PaSTe, SimpleNet, CFA, Dinomaly).

Each trained method's ``Params`` extends :class:`TrainingParams` and sets its own defaults:
the defaults are small CPU-friendly schedules for the built-in data; ``PAPER_TRAINING`` on
each method holds the original paper's schedule for real data (used by the paper sweeps).
The training batch size is ``dataset.batch_size``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

import torch
from pydantic import Field

from cvad.models.base import MethodParams, Task


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stops rather than storing a broken model."""


class TrainingParams(MethodParams):
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="optimiser of the trained parts")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only)")
    epochs: int = Field(2, ge=1, description="passes over each task's training images (plus replay)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value; null: no clipping")


def make_optimizer(params: TrainingParams, groups: Iterable[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
    """The configured optimiser over parameters or parameter groups (groups may set their own lr)."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=params.lr, weight_decay=params.weight_decay)


def train_epochs(
    task: Task,
    params: TrainingParams,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    method: str,
) -> list[float]:
    """Run ``params.epochs`` passes of ``loss_of`` over the task's batches; return the mean loss per epoch.

    Reports ``train_epoch`` events through ``task.report`` and raises
    :class:`TrainingDivergedError` on the first non-finite loss.
    """
    history = []
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(1, params.epochs + 1):
        total, batches = 0.0, 0
        for images in task.train:
            loss = loss_of(images)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"{method}: the training loss became {value} at epoch {epoch}/{params.epochs}, batch {batches + 1} "
                    f"of task {task.index + 1} ({task.name}); lower model.params.lr (now {params.lr:g}) "
                    "or set model.params.grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trained, params.grad_clip)
            optimizer.step()
            total += value
            batches += 1
        if batches == 0:
            raise ValueError(f"{method}: task {task.index + 1} ({task.name}) has no training images")
        history.append(total / batches)
        task.report("train_epoch", {"step": task.index, "epoch": epoch, "epochs": params.epochs, "loss": history[-1]})
    return history
