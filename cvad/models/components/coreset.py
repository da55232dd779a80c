"""Greedy k-center (Gonzalez farthest-first) coreset selection and chunked nearest neighbours.

The selection keeps, for each point, an upper bound on its distance to the chosen set and
tightens it lazily: only points whose bound could make them the next pick are measured, in
matrix products against the centres they have not seen yet. O(N d) memory, never an N x N
matrix. The returned order is the greedy order, so every prefix of a selection is itself the
greedy selection of that size (the prefix property PatchCoreCL++ relies on).
"""

from __future__ import annotations

import torch

from cvad.backbones import tracing

# Elements of a query x bank distance block; bounds nearest-neighbour memory (~64 MB fp32).
DISTANCE_BLOCK = 1 << 24
# Points with the largest distance bounds that the k-center search keeps at hand; the rest are
# revisited only once every one of these has fallen below the smallest of their first bounds.
K_CENTER_POOL = 4096
# Stale points measured per step of the search (the highest bounds first).
K_CENTER_REFRESH = 256


def project(features: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """Seeded Gaussian random projection to ``dim`` dims (Johnson-Lindenstrauss), used only to select."""
    if dim is None or dim >= features.shape[1]:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(features.device, features.dtype)


class _FarthestFirst:
    """State of one lazy farthest-first search.

    ``bound[p]`` is p's squared distance to the centres ``[0, seen[p])``: an upper bound on its
    distance to the whole chosen set, exact when ``seen[p]`` equals the number chosen. Adding a
    centre only lowers distances, so a point whose exact value beats every other point's bound
    is the exact farthest point, and only points with a bound above it ever need measuring.
    """

    def __init__(self, z: torch.Tensor, k: int, start: int) -> None:
        self.z, self.norms = z, z.square().sum(dim=1)
        self.centres = torch.empty(k, z.shape[1], device=z.device)
        self.centre_norms = torch.empty(k, device=z.device)
        self.count = 0
        # Every point measured against the first centre at once; seen = 1 everywhere.
        self.bound = (self.norms - 2 * (z @ z[start]) + self.norms[start]).clamp_min_(0)
        self.seen = torch.ones(z.shape[0], dtype=torch.long, device=z.device)
        self.add(start)

    def add(self, point: int) -> None:
        self.centres[self.count] = self.z[point]
        self.centre_norms[self.count] = self.norms[point]
        self.count += 1
        self.bound[point] = -1.0  # chosen: never the farthest again

    def measure(self, points: torch.Tensor) -> None:
        """Make ``points``' bounds exact; points grouped so none is measured against over 2x the centres it missed."""
        seen = self.seen.index_select(0, points)
        order = torch.argsort(seen, descending=True)
        points, missed = points[order], (self.count - seen[order]).tolist()
        first = 0
        while first < len(missed):
            end = first + 1
            while end < len(missed) and missed[end] <= 2 * missed[first]:
                end += 1
            group, since = points[first:end], self.count - missed[end - 1]
            squared = torch.addmm(
                self.centre_norms[since : self.count],
                self.z.index_select(0, group),
                self.centres[since : self.count].T,
                alpha=-2,
            ).amin(dim=1)
            squared.add_(self.norms.index_select(0, group)).clamp_min_(0)
            self.bound.index_copy_(0, group, torch.minimum(self.bound.index_select(0, group), squared))
            first = end
        self.seen.index_fill_(0, points, self.count)

    def farthest(self, pool: torch.Tensor, floor: float) -> int | None:
        """The farthest point if it is in ``pool`` (every other point's bound is below ``floor``), else None."""
        while True:
            bounds = self.bound.index_select(0, pool)
            exact = self.seen.index_select(0, pool) == self.count
            best = float(bounds[exact].max()) if bool(exact.any()) else float("-inf")
            stale = (~exact) & (bounds > best)
            if not bool(stale.any()):
                return int(pool[torch.where(exact, bounds, float("-inf")).argmax()]) if best >= floor else None
            candidates, candidate_bounds = pool[stale], bounds[stale]
            if candidates.numel() > K_CENTER_REFRESH:
                candidates = candidates[candidate_bounds.topk(K_CENTER_REFRESH, sorted=False).indices]
            self.measure(candidates)


def greedy_k_center(features: torch.Tensor, k: int, *, seed: int, projection_dim: int | None = 128) -> torch.Tensor:
    """Indices of ``k`` points in greedy farthest-first order, starting from one seeded point.

    Exact farthest-first (up to float32 rounding of the distances), computed lazily: the search
    keeps the points with the highest distance bounds in a pool and measures only those that
    could still be the farthest, each against just the centres added since it was last measured.
    On patch features about a hundred points per pick are measured instead of all N.
    """
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    z = project(features.float(), projection_dim, seed).contiguous()
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    search = _FarthestFirst(z, k, start)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = start
    pool, floor = None, float("-inf")
    for i in range(1, k):
        pick = None
        while pick is None:
            if pool is None or pool.numel() == 0:
                bounds, pool = search.bound.topk(min(K_CENTER_POOL, n), sorted=False)
                floor = float(bounds.min())  # every point outside the pool has a bound at most this
            pick = search.farthest(pool, floor)
            if pick is None:
                pool = None
        chosen[i] = pick
        search.add(pick)
        pool = pool[search.bound.index_select(0, pool) >= floor]
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
    # A traced or exported graph takes one block: a block count that depends on the batch would fix the batch size.
    blocks = [queries] if tracing() else queries.split(rows)
    dists, indices = [], []
    for block in blocks:
        partial = torch.addmm(bank_norms, block, bank.T, alpha=-2)
        value, index = partial.min(dim=1)
        dists.append(value.add_(block.square().sum(dim=1)).clamp_min_(0).sqrt_())
        indices.append(index)
    return torch.cat(dists), torch.cat(indices)
