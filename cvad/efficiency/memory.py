"""Stored bytes: ``memory_footprint`` and its ``MemoryReport``, each storage byte counted once.

``memory_footprint`` adds ``numel * element_size`` of the real tensors a model stores,
in MB = 2^20 bytes (the paper's unit: its replay-100 and replay-40 rows differ by
60 x 150,528 B / 2^20 = 8.61 MB); the byte counts are kept. Storage is counted once: a
tensor listed in two parts (a teacher's layers shared with the student) counts in the
first part only, and views count the storage bytes they actually cover, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BYTES_PER_MB = 2**20  # MiB, the paper's MB


@dataclass
class MemoryReport:
    """Bytes a deployed model stores, each storage counted once; MB = 2^20 bytes."""

    bytes_by_part: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_part.values())

    @property
    def total_mb(self) -> float:
        return self.total_bytes / BYTES_PER_MB

    @property
    def breakdown_mb(self) -> dict[str, float]:
        return {part: count / BYTES_PER_MB for part, count in self.bytes_by_part.items()}


def _element_runs(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """Start offsets (in elements, within the storage) of the contiguous runs a tensor covers, and the run length."""
    dims = sorted(
        ((size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1 and stride != 0),
        key=lambda dim: dim[1],
    )
    run = 1
    while dims and dims[0][1] == run:  # innermost dims laid out back to back form one run
        run *= dims.pop(0)[0]
    starts = np.array([tensor.storage_offset()], dtype=np.int64)
    for size, stride in dims:
        starts = (starts[:, None] + np.arange(size, dtype=np.int64) * stride).ravel()
    return starts, run


def _merge(intervals: np.ndarray) -> np.ndarray:
    """Union of half-open [start, end) intervals, as sorted disjoint intervals."""
    intervals = intervals[np.argsort(intervals[:, 0], kind="stable")]
    reach = np.maximum.accumulate(intervals[:, 1])
    opens = np.ones(len(intervals), dtype=bool)
    opens[1:] = intervals[1:, 0] > reach[:-1]
    first = np.flatnonzero(opens)
    return np.stack([intervals[first, 0], np.maximum.reduceat(intervals[:, 1], first)], axis=1)


def _covered_bytes(intervals: np.ndarray) -> int:
    return int((intervals[:, 1] - intervals[:, 0]).sum())


def memory_footprint(parts: dict[str, list[torch.Tensor]]) -> MemoryReport:
    """Bytes of the tensors in ``parts``, every storage byte counted once, first part wins."""
    if not isinstance(parts, dict):
        raise TypeError(f"memory_footprint expects a dict of part name -> list of tensors, got {type(parts).__name__}")
    covered: dict[tuple[str, int | None, int], np.ndarray] = {}  # storage -> byte intervals counted so far
    bytes_by_part: dict[str, int] = {}
    for part, tensors in parts.items():
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
            raise TypeError(
                f"part {part!r} must be a list of tensors, got {type(tensors).__name__}; wrap it as [tensor]"
            )
        new_bytes = 0
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"part {part!r}, item {index}: expected a tensor, got {type(tensor).__name__}")
            if tensor.layout != torch.strided:
                raise TypeError(
                    f"part {part!r}, item {index}: only dense tensors are counted, got layout {tensor.layout}"
                )
            if tensor.device.type == "meta":
                raise ValueError(
                    f"part {part!r}, item {index}: a meta tensor has no data to count; pass the real tensor"
                )
            if tensor.numel() == 0:
                continue
            size = tensor.element_size()
            starts, run = _element_runs(tensor)
            intervals = np.stack([starts * size, (starts + run) * size], axis=1)
            key = (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())
            before = covered.get(key)
            merged = _merge(intervals if before is None else np.concatenate([before, intervals]))
            new_bytes += _covered_bytes(merged) - (0 if before is None else _covered_bytes(before))
            covered[key] = merged
        bytes_by_part[part] = new_bytes
    return MemoryReport(bytes_by_part=bytes_by_part)
