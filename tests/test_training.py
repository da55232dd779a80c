"""The shared training loop: budgets in updates (joint = the whole stream), epochs when asked, divergence stops."""

from __future__ import annotations

import pytest
import torch

from cvad.models.base import Task
from cvad.models.components.training import TrainingParams, make_optimizer, train_loop, update_budget
from cvad.progress import TrainPass


def task_with(batches: int, tasks_covered: int = 1) -> Task:
    images = [torch.rand(2, 3, 4, 4) for _ in range(batches)]
    return Task(index=0, name="t", train=images, tasks_covered=tasks_covered)


class Learner(torch.nn.Module):
    """The least a method needs for the loop: a name, training params and a trained weight."""

    name = "learner"

    def __init__(self, params: TrainingParams) -> None:
        super().__init__()
        self.params = params
        self.weight = torch.nn.Parameter(torch.zeros(1))


def run(task: Task, on_update=None, **params) -> int:
    """Updates the loop makes under ``params``."""
    learner = Learner(TrainingParams(**params))
    updates = []

    def loss_of(images: torch.Tensor) -> torch.Tensor:
        updates.append(learner.training)
        return (learner.weight - images.mean()) ** 2

    train_loop(learner, task, make_optimizer(learner.params, [learner.weight]), loss_of, on_update)
    assert all(updates) and not learner.training  # training mode inside the loop only
    return len(updates)


def test_a_joint_step_gets_the_updates_of_the_whole_stream():
    stream = sum(run(task_with(batches=3), steps=7) for _ in range(5))
    joint = run(task_with(batches=15, tasks_covered=5), steps=7)
    assert stream == joint == 35  # steps cycle over a small task's batches and stop mid-pass on a large one


def test_epochs_count_passes_and_replace_the_default_steps():
    settings = TrainingParams(epochs=4)
    assert settings.steps is None
    assert update_budget(task_with(batches=3), settings) == 12 == run(task_with(batches=3), epochs=4)
    with pytest.raises(ValueError, match="one training budget"):
        TrainingParams(epochs=4, steps=10)


def test_each_pass_reports_its_mean_loss():
    events = []
    task = task_with(batches=4)
    task.report = events.append
    run(task, steps=10)
    assert all(isinstance(e, TrainPass) for e in events)
    assert [e.number for e in events] == [1, 2, 3] and all(e.passes == 3 for e in events)  # 4 + 4 + 2 updates


def test_the_schedule_hook_sees_every_update_before_it_runs():
    seen = []
    assert run(task_with(batches=3), on_update=lambda update, total: seen.append((update, total)), steps=5) == 5
    assert seen == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5)]
