"""Replay buffer: at most R uint8 images, balanced over seen tasks, seeded."""

from __future__ import annotations

import pytest
import torch

from cvad.continual.replay import ReplayBuffer
from cvad.efficiency import memory_footprint


def task_images(task: int, n: int, size: int = 8) -> list[dict]:
    return [{"image": torch.full((3, size, size), task * 10 + i % 10, dtype=torch.uint8)} for i in range(n)]


def test_buffer_stays_within_capacity_and_balanced():
    buffer = ReplayBuffer(capacity=10, image_size=8, seed=0)
    sizes = [30, 3, 30, 30]
    expected = [[10], [7, 3], [4, 3, 3], [3, 3, 2, 2]]
    for t, n in enumerate(sizes):
        buffer.add_task(task_images(t, n))
        assert len(buffer) <= 10
        assert buffer.counts() == expected[t]
    # Each kept image still belongs to its task (values 10*t .. 10*t+9).
    for image, task in zip(buffer.images(), buffer.task_ids):
        assert 10 * task <= int(image[0, 0, 0]) < 10 * task + 10
    assert buffer.images().dtype == torch.uint8


def test_buffer_bytes_appear_in_memory_accounting():
    buffer = ReplayBuffer(capacity=40, image_size=224, seed=0)
    buffer.add_task(task_images(0, 50, size=224))
    report = memory_footprint({"replay_buffer": buffer.stored})
    assert report.bytes_by_part["replay_buffer"] == 40 * 150_528


def test_same_seed_same_buffer_and_bad_capacity():
    a, b = ReplayBuffer(5, 8, seed=3), ReplayBuffer(5, 8, seed=3)
    for buf in (a, b):
        buf.add_task(
            [
                {
                    "image": torch.randint(
                        0, 255, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)
                    )
                }
                for i in range(20)
            ]
        )
    assert torch.equal(a.images(), b.images())
    with pytest.raises(ValueError, match="at least 1"):
        ReplayBuffer(0, 8, seed=0)
