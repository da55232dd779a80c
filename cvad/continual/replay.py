"""Replay buffer: at most R training images, spread evenly over the tasks seen so far.

Images are kept at the model's input size in the form the device stores them
(``compression.replay``): raw uint8 pixels, or the bytes of a JPEG file, decoded each time a
method trains on them. The buffer's memory is read off those stored tensors.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cvad.runtime import step_seed


class ReplayBuffer(Dataset):
    """Balanced, seeded reservoir of past tasks' normal images."""

    def __init__(self, capacity: int, image_size: int, seed: int, jpeg_quality: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.image_size = image_size
        self.seed = seed
        self.jpeg_quality = jpeg_quality  # None: raw pixels
        self.stored: list[torch.Tensor] = []  # per image: [3, S, S] uint8 pixels, or a JPEG file's bytes (1-D uint8)
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
            kept_images += [self.stored[int(i)] for i in keep]
            kept_ids.append(self.task_ids[keep])
        n_new = quotas[-1]
        chosen = torch.randperm(len(task_images), generator=generator)[:n_new].sort().values
        kept_images += [self.encode(task_images[int(i)]["image"]) for i in chosen]
        kept_ids.append(torch.full((n_new,), self.tasks_seen, dtype=torch.int64))
        self.stored = kept_images
        self.task_ids = torch.cat(kept_ids)
        self.tasks_seen += 1

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """What the device keeps of an image [3, S, S]: its pixels, or a JPEG file's bytes (libjpeg, via Pillow)."""
        if self.jpeg_quality is None:
            return image.clone()
        file = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(file, format="JPEG", quality=self.jpeg_quality)
        return torch.frombuffer(bytearray(file.getvalue()), dtype=torch.uint8)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        if self.jpeg_quality is None:
            return stored
        with Image.open(io.BytesIO(stored.numpy().tobytes())) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()

    def images(self) -> torch.Tensor:
        """The buffer's images as a method trains on them, uint8 [N, 3, S, S]."""
        size = self.image_size
        if not self.stored:
            return torch.empty(0, 3, size, size, dtype=torch.uint8)
        return torch.stack([self.decode(stored) for stored in self.stored])

    def state(self) -> dict:
        """What a detector file keeps of the buffer: the bytes the device stores per image, and their tasks."""
        state = {"capacity": self.capacity, "task_ids": self.task_ids, "tasks": self.tasks_seen}
        if self.jpeg_quality is None:
            return state | {"images": self.images()}
        return state | {"jpeg": list(self.stored), "jpeg_quality": self.jpeg_quality}

    @classmethod
    def from_state(cls, state: dict, image_size: int, seed: int) -> ReplayBuffer:
        buffer = cls(int(state["capacity"]), image_size, seed, state.get("jpeg_quality"))
        buffer.stored = list(state["jpeg"]) if "jpeg" in state else list(state["images"])
        buffer.task_ids, buffer.tasks_seen = state["task_ids"], int(state["tasks"])
        return buffer

    def counts(self) -> list[int]:
        return [int((self.task_ids == t).sum()) for t in range(self.tasks_seen)]

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, index: int) -> dict:
        image = self.decode(self.stored[index])
        return {"image": image, "mask": torch.zeros(image.shape[-2:], dtype=torch.bool), "label": 0}
