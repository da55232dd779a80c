"""Per-position Gaussian statistics: exact merging, uniform averaging, Mahalanobis scoring.

Statistics are accumulated in float64 and merged with the parallel-axis rule, so fitting
batch by batch, or task by task (PaDiM ``unimodal``), equals one fit on all samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GaussianStats:
    """Count, mean [P, d] and biased (divide-by-n) covariance [P, d, d] or variance [P, d]."""

    count: int
    mean: torch.Tensor
    cov: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.cov.dim() == self.mean.dim()

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Exact statistics of the union of both sample sets (docs/methods.md section 5, unimodal)."""
        n = self.count + other.count
        mean = (self.count * self.mean + other.count * other.mean) / n
        da, db = self.mean - mean, other.mean - mean
        if self.diagonal:
            spread_a, spread_b = da.square(), db.square()
        else:
            spread_a, spread_b = da.unsqueeze(-1) * da.unsqueeze(-2), db.unsqueeze(-1) * db.unsqueeze(-2)
        cov = (self.count * (self.cov + spread_a) + other.count * (other.cov + spread_b)) / n
        return GaussianStats(n, mean, cov)

    def unbiased_cov(self) -> torch.Tensor:
        """Sample covariance (divide by n-1), as PaDiM scores with; the biased one for n = 1."""
        return self.cov * (self.count / (self.count - 1)) if self.count > 1 else self.cov


# Images converted to float64 at once while accumulating.
ACCUMULATION_CHUNK = 8


class GaussianAccumulator:
    """Streams [B, P, d] batches into GaussianStats with one float64 [P, d, d] buffer.

    Sums are taken around the first batch's mean, which keeps float64 cancellation
    negligible without a second pass over the data. ``stats`` turns the buffer into the
    covariance in place: an accumulator gives its statistics once.
    """

    def __init__(self, diagonal: bool) -> None:
        self.diagonal = diagonal
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = x.double().mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            p, d = self.shift.shape
            self.sum_sq = self.shift.new_zeros((p, d) if self.diagonal else (p, d, d))
        for images in x.split(ACCUMULATION_CHUNK):  # float64 copies of a few images at a time
            c = (images.double() - self.shift).contiguous()  # batched matmul is ~10x slower on strided input
            self.sum += c.sum(dim=0)
            if self.diagonal:
                self.sum_sq += c.square().sum(dim=0)
            else:
                ct = c.permute(1, 0, 2)  # [P, B, d]
                self.sum_sq.baddbmm_(ct.transpose(1, 2), ct)  # in place: no second [P, d, d] buffer
        self.count += x.shape[0]

    def stats(self) -> GaussianStats:
        if self.count == 0:
            raise ValueError("no samples were accumulated: the task's training set is empty")
        if self.sum_sq is None:
            raise RuntimeError("this accumulator already gave its statistics")
        centred_mean = self.sum / self.count
        cov, self.sum_sq = self.sum_sq.div_(self.count), None
        if self.diagonal:
            cov.sub_(centred_mean.square())
        else:
            cov.baddbmm_(centred_mean.unsqueeze(-1), centred_mean.unsqueeze(-2), alpha=-1)
        return GaussianStats(self.count, self.shift + centred_mean, cov)


def uniform_average(old: GaussianStats, new: GaussianStats, old_tasks: int) -> GaussianStats:
    """The earlier CL benchmark's rule: every task's mean and covariance weighs 1/t.

    ``old`` is already the uniform average of ``old_tasks`` tasks; sample counts and the
    shift between task means are ignored, which biases the result when tasks differ in size.
    """
    t = old_tasks + 1
    mean = (old_tasks * old.mean + new.mean) / t
    cov = (old_tasks * old.cov + new.cov) / t
    return GaussianStats(old.count + new.count, mean, cov)


# Positions whitened at once: bounds the temporaries to a few MB instead of copies of [P, d, d].
WHITENING_CHUNK = 256


def whitening_factor(stats: GaussianStats, epsilon: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """W = L^-1 with L L^T = sample covariance + epsilon I (computed in float64, batched over positions).

    ||W (x - mu)|| is the Mahalanobis distance: one matrix-vector product per position at
    scoring time, far faster on CPUs than a triangular solve per image, and W is lower triangular.
    ``out`` (e.g. the float32 store) receives W chunk by chunk, so no whole float64 copy exists.
    """
    cov = stats.cov
    scale = stats.count / (stats.count - 1) if stats.count > 1 else 1.0  # the unbiased covariance
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    whitening = torch.empty_like(cov) if out is None else out
    for block, target in zip(cov.split(WHITENING_CHUNK), whitening.split(WHITENING_CHUNK)):
        # A triangular solve against I: 2.5x faster than a general inverse of L (torch 2.14, 2 cores).
        factor = torch.linalg.cholesky(block * scale + epsilon * eye)
        target.copy_(torch.linalg.solve_triangular(factor, eye, upper=False))
    return whitening


def stats_from_whitening(count: int, mean: torch.Tensor, whitening: torch.Tensor, epsilon: float) -> GaussianStats:
    """Inverse of ``whitening_factor``: recover the biased covariance from a stored W."""
    w = whitening.double()
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    chol = torch.linalg.inv(w).tril_()
    unbiased = chol @ chol.transpose(-1, -2) - epsilon * eye
    cov = unbiased * ((count - 1) / count) if count > 1 else unbiased
    return GaussianStats(count, mean.double(), cov)


def mahalanobis_full(x: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """||W (x - mu)|| per position: x [B, P, d], mean [P, d], whitening [P, d, d] -> [B, P].

    The batched matmul reads the difference through a [P, d, B] view (no transposed copy) and the
    squares and sums run in place on its output: close to the bare matmul (``bench/scoring.py``).
    """
    whitened = torch.bmm(whitening, (x - mean).permute(1, 2, 0))  # [P, d, B]
    return whitened.square_().sum(dim=1).sqrt_().transpose(0, 1)


def mahalanobis_diagonal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, epsilon: float) -> torch.Tensor:
    """sqrt(sum_k (x_k - mu_k)^2 / (var_k + epsilon)) per position: [B, P, d] -> [B, P]."""
    return ((x - mean).square() / (var + epsilon)).sum(dim=-1).sqrt()
