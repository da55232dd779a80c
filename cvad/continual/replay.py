"""Replay buffer: at most R training images, spread evenly over the tasks seen so far.

Images are kept as uint8 at the model's input size, exactly the bytes an edge device
would store, so the buffer's memory is read off its tensor.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cvad.runtime import step_seed


class ReplayBuffer(Dataset):
    """Balanced, seeded reservoir of past tasks' normal images."""

    def __init__(self, capacity: int, image_size: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.images = torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
        self.task_ids = torch.empty(0, dtype=torch.int64)
        self.tasks_seen = 0

    def quotas(self, available: list[int]) -> list[int]:
        """Even shares of the capacity; a task with fewer images leaves its unused share to others.

        Remainders go to the earliest tasks, so the split is deterministic.
        """
        quotas = [0] * len(available)
        remaining = self.capacity
        while remaining > 0:
            open_tasks = [i for i, (q, a) in enumerate(zip(quotas, available)) if q < a]
            if not open_tasks:
                break
            share, extra = divmod(remaining, len(open_tasks))
            for rank, i in enumerate(open_tasks):
                give = min(share + (1 if share == 0 and rank < extra else 0), available[i] - quotas[i])
                quotas[i] += give
                remaining -= give
        return quotas

    def add_task(self, task_images: Dataset) -> None:
        """Shrink old tasks' shares at random and draw the new task's share from ``task_images``.

        Each task's draws come from the run's seed and the task's position alone, so a buffer saved with a
        detector and continued by ``cvad learn`` draws what ``cvad run`` would have drawn.
        """
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.tasks_seen))
        quotas = self.quotas(self.counts() + [len(task_images)])
        kept_images, kept_ids = [], []
        for task, quota in enumerate(quotas[:-1]):
            idx = (self.task_ids == task).nonzero().flatten()
            keep = idx[torch.randperm(len(idx), generator=generator)[:quota]].sort().values
            kept_images.append(self.images[keep])
            kept_ids.append(self.task_ids[keep])
        n_new = quotas[-1]
        chosen = torch.randperm(len(task_images), generator=generator)[:n_new].sort().values
        kept_images.append(torch.stack([task_images[int(i)]["image"] for i in chosen]) if n_new else self.images[:0])
        kept_ids.append(torch.full((n_new,), self.tasks_seen, dtype=torch.int64))
        self.images = torch.cat(kept_images)
        self.task_ids = torch.cat(kept_ids)
        self.tasks_seen += 1

    def state(self) -> dict:
        """What a detector file keeps of the buffer: its images (the bytes the device stores) and their tasks."""
        return {"capacity": self.capacity, "images": self.images, "task_ids": self.task_ids, "tasks": self.tasks_seen}

    @classmethod
    def from_state(cls, state: dict, seed: int) -> ReplayBuffer:
        buffer = cls(int(state["capacity"]), state["images"].shape[-1], seed)
        buffer.images, buffer.task_ids, buffer.tasks_seen = state["images"], state["task_ids"], int(state["tasks"])
        return buffer

    def counts(self) -> list[int]:
        return [int((self.task_ids == t).sum()) for t in range(self.tasks_seen)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {"image": image, "mask": torch.zeros(image.shape[-2:], dtype=torch.bool), "label": 0}
