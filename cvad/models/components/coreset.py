"""Greedy k-center (Gonzalez farthest-first) coreset selection and chunked nearest neighbours.

The selection keeps a vector of each point's distance to the chosen set and updates it
with one (pruned) matrix-vector product per pick: O(N d) memory, never an N x N
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
    """Indices of ``k`` points in greedy farthest-first order, starting from one seeded point.

    Exact farthest-first, pruned with the triangle inequality: a point p whose nearest
    chosen centre a is at distance d(p) cannot get closer to a new centre c when
    |c - a| >= 2 d(p), so only the other points are measured against c. On clustered
    data (patch features) that skips most of the N x d matrix-vector product per pick.
    """
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    z = project(features.float(), projection_dim, seed).contiguous()
    norms = z.square().sum(dim=1)

    def distances(rows: torch.Tensor | None, centre: int) -> torch.Tensor:
        # index_select is several times faster than advanced indexing for row gathers on CPU.
        block, block_norms = (z, norms) if rows is None else (z.index_select(0, rows), norms.index_select(0, rows))
        return (block_norms - 2 * (block @ z[centre]) + norms[centre]).clamp_min_(0).sqrt_()

    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = start
    centres = torch.empty(k, z.shape[1], device=z.device)
    centres[0] = z[start]
    min_dist = distances(None, start)  # Euclidean distance to the nearest chosen centre
    owner = torch.zeros(n, dtype=torch.long, device=z.device)  # which chosen centre (by rank) that is
    for i in range(1, k):
        pick = int(torch.argmax(min_dist))
        chosen[i] = pick
        centres[i] = z[pick]
        gaps = (centres[:i] - centres[i]).norm(dim=1)  # new centre to every earlier one
        # Small slack keeps the pruning exact under float rounding.
        reach = gaps.index_select(0, owner)
        candidates = (reach < min_dist.mul(2 * (1 + 1e-5)).add_(1e-6)).nonzero().squeeze(1)
        d = distances(candidates, pick)
        closer = d < min_dist.index_select(0, candidates)
        improved = candidates[closer]
        min_dist.index_copy_(0, improved, d[closer])
        owner.index_fill_(0, improved, i)
    return chosen


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance and index of each query's nearest bank row, in memory-bounded blocks.

    ``queries`` [Q, d], ``bank`` [M, d] -> ([Q], [Q]). The block's |m|^2 - 2 x.m comes out of one
    fused matrix multiply (``addmm``) and is reduced once; |x|^2, constant along a row, is added
    to the minima only: one pass over the Q x M block instead of four. ``bank_norms`` (|m|^2, [M]) may be
    passed by a caller that needs them too.
    """
    if bank_norms is None:
        bank_norms = bank.square().sum(dim=1)
    rows = max(1, DISTANCE_BLOCK // max(1, bank.shape[0]))
    # An exported graph takes one block: a block count that depends on the batch would fix the batch size.
    blocks = [queries] if torch.compiler.is_exporting() else queries.split(rows)
    dists, indices = [], []
    for block in blocks:
        partial = torch.addmm(bank_norms, block, bank.T, alpha=-2)
        value, index = partial.min(dim=1)
        dists.append(value.add_(block.square().sum(dim=1)).clamp_min_(0).sqrt_())
        indices.append(index)
    return torch.cat(dists), torch.cat(indices)
