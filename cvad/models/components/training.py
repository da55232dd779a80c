"""Shared training glue for the methods that learn weights (STFPM, PaSTe, SimpleNet, CFA, Dinomaly).

Each trained method's ``Params`` extends :class:`~cvad.methods.base.TrainingParams` and sets its own
defaults: the defaults are small CPU-friendly schedules for the built-in data; ``PAPER_TRAINING`` on
each method holds the original paper's schedule for real data (used by the paper preset).
The training batch size is ``dataset.batch_size``.

A step's training budget is counted in optimizer updates. With ``steps`` (the defaults), a
step gets ``steps`` updates per task it trains on: every stream step gets the same number
whatever its buffer holds, and a joint step over T tasks gets T x steps, as many as the whole
stream, so joint training is the upper bound it is meant to be. With ``epochs`` (the original
papers' schedules), a step gets that many passes over its images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from cvad.methods.base import TrainingParams
from cvad.models.base import AnomalyModel, Task
from cvad.progress import TrainPass


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stops rather than storing a broken model."""


def make_optimizer(params: TrainingParams, groups: Iterable[torch.nn.Parameter] | list[dict]) -> torch.optim.Optimizer:
    """The configured optimiser over parameters or parameter groups (groups may set their own lr)."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=params.lr, weight_decay=params.weight_decay)


def update_budget(task: Task, params: TrainingParams) -> int:
    """Optimizer updates a step gets: ``steps`` per task it covers, or ``epochs`` passes over its batches."""
    if params.epochs is not None:
        return params.epochs * len(task.train)
    return params.steps * task.tasks_covered


def train_loop(
    model: AnomalyModel,
    task: Task,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    on_update: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Run the step's update budget in passes over its batches; return the mean loss of each pass.

    ``model.params`` (a :class:`TrainingParams`) sets the budget and the gradient clip. The model
    is in training mode while the loop runs and in eval mode after it. ``on_update(update, total)``
    runs before each update (0-based), for schedules (learning rate, loss weights). Reports a
    :class:`~cvad.progress.TrainPass` per pass through ``task.report`` and raises
    :class:`TrainingDivergedError` on the first non-finite loss.
    """
    params: TrainingParams = model.params
    batches_per_pass = len(task.train)
    if batches_per_pass == 0:
        raise ValueError(f"{model.name}: task {task.index + 1} ({task.name}) has no training images")
    total = update_budget(task, params)
    passes = math.ceil(total / batches_per_pass)
    history = []
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    done = 0
    model.train()
    try:
        for number in range(1, passes + 1):
            pass_loss, batches = 0.0, 0
            for images in task.train:
                if done == total:
                    break
                if on_update is not None:
                    on_update(done, total)
                loss = loss_of(images)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"{model.name}: the training loss became {value} at update {done + 1}/{total} (pass {number}) "
                        f"of task {task.index + 1} ({task.name}); lower model.params.lr (now {params.lr:g}) "
                        "or set model.params.grad_clip"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if params.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trained, params.grad_clip)
                optimizer.step()
                pass_loss += value
                batches += 1
                done += 1
            history.append(pass_loss / batches)
            task.report(TrainPass(step=task.index, number=number, passes=passes, loss=history[-1]))
    finally:
        model.eval()
    return history
