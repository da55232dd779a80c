"""Greedy k-center (Gonzalez farthest-first) coreset selection and chunked nearest neighbours.

The selection keeps a vector of each point's squared distance to the chosen set and
updates it with one matrix-vector product per pick: O(N d) memory, never an N x N
matrix. The returned order is the greedy order, so every prefix of a selection is
itself the greedy selection of that size (the prefix property PatchCoreCL++ relies on).
"""

from __future__ import annotations

import torch

# Elements of a query x bank distance block; bounds nearest-neighbour memory (~64 MB fp32).
DISTANCE_BLOCK = 1 << 24


def project(features: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """Seeded Gaussian random projection to ``dim`` dims (Johnson-Lindenstrauss), used only to select."""
    if dim is None or dim >= features.shape[1]:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(features.device, features.dtype)


def greedy_k_center(features: torch.Tensor, k: int, *, seed: int, projection_dim: int | None = 128) -> torch.Tensor:
    """Indices of ``k`` points in greedy farthest-first order, starting from one seeded point."""
    n = features.shape[0]
    if k >= n:
        k = n
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    z = project(features.float(), projection_dim, seed)
    norms = z.square().sum(dim=1)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = start
    min_dist = (norms - 2 * (z @ z[start]) + norms[start]).clamp_min_(0)
    for i in range(1, k):
        pick = int(torch.argmax(min_dist))
        chosen[i] = pick
        torch.minimum(min_dist, (norms - 2 * (z @ z[pick]) + norms[pick]).clamp_min_(0), out=min_dist)
    return chosen


def nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance and index of each query's nearest bank row, in memory-bounded blocks.

    ``queries`` [Q, d], ``bank`` [M, d] -> ([Q], [Q]). Uses |x|^2 - 2 x.m + |m|^2 (matmul).
    """
    bank_norms = bank.square().sum(dim=1)
    rows = max(1, DISTANCE_BLOCK // max(1, bank.shape[0]))
    dists, indices = [], []
    for block in queries.split(rows):
        d2 = block.square().sum(dim=1, keepdim=True) - 2 * block @ bank.T + bank_norms
        value, index = d2.min(dim=1)
        dists.append(value.clamp_min(0).sqrt())
        indices.append(index)
    return torch.cat(dists), torch.cat(indices)
