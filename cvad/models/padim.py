"""PaDiM and its continual variants (docs/methods.md section 5).

One Gaussian per feature-grid position over the backbone levels ``layers`` names (by default
the last blocks at strides 4, 8 and 16), concatenated on the finest grid, a seeded random
subset of ``n_features`` channels kept. ``covariance`` picks full PaDiM or PaDiM-Lite (diagonal); ``continual`` picks
how a new task meets the stored statistics:

- ``refit``: forget, fit the new task alone (plain PaDiM; the fine-tuning lower bound);
- ``original``: uniform average of per-task estimates (the earlier CL benchmark's rule);
- ``unimodal``: exact sample-weighted merge, one Gaussian, memory independent of T;
- ``multimodal``: one Gaussian per task, score = min over tasks, memory grows with T.

Stored state: per mode the count (int64), the mean (float32), and for full covariance the
whitening factor W = L^-1, L L^T = sample covariance + eps I. W is what scoring needs
(distance = ||W (x - mu)||, one matrix-vector product per position) and, inverted,
gives back the covariance that later merges need (relative error ~1e-7, tested).
Lite stores the sample variance; eps is added when scoring.
"""

from __future__ import annotations

import torch

from cvad.backbones import FeatureExtractor
from cvad.methods.padim import PaDiMParams, PaDiMSpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.gaussian import (
    GaussianAccumulator,
    GaussianStats,
    mahalanobis_diagonal,
    mahalanobis_full,
    stats_from_whitening,
    uniform_average,
    whitening_factor,
)
from cvad.models.components.maps import AnomalyMapHead, concat_at_first_grid


class PaDiM(PaDiMSpec, AnomalyModel):
    params: PaDiMParams

    def __init__(self, params: PaDiMParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.backbone = FeatureExtractor(setup.backbone, params.layers, setup.weights)
        total = sum(self.backbone.channels)
        d = total if params.n_features is None else min(params.n_features, total)
        generator = torch.Generator().manual_seed(setup.seed)
        self.register_buffer("channel_index", torch.randperm(total, generator=generator)[:d].sort().values)
        self.head = AnomalyMapHead(setup.image_size, params.blur_sigma)
        # Tasks folded into the stored statistics (``original`` weights by it); a buffer so a saved fit resumes.
        self.register_buffer("tasks_merged", torch.tensor(0))
        # Modes of the stored mixture, filled by fit_task: [K], [K, P, d], [K, P, d, d] or [K, P, d].
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("means", torch.zeros(0))
        self.register_buffer("shapes", torch.zeros(0))  # whitening factors (full) or variances (diagonal)
        # Means and shapes are kept as compression.memory says (fp32 or fp16) and scored in float32.
        self.stored_dtype = torch.float16 if setup.compression.memory == "fp16" else torch.float32

    @property
    def diagonal(self) -> bool:
        return self.params.covariance == "diagonal"

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, S, S] -> [B, P, d] patch embeddings on the finest level's grid, and that grid."""
        # Each coarse cell repeated over the finer cells it covers, as PaDiM does (bilinear blurs the
        # coarse levels' statistics across cell borders: 0.02-0.07 lower image AUROC on bench/vs_anomalib.py data).
        emb = concat_at_first_grid(self.backbone(images), mode="nearest")
        emb = emb.index_select(1, self.channel_index)
        return emb.flatten(2).transpose(1, 2).contiguous(), tuple(emb.shape[-2:])

    @torch.no_grad()
    def fit_task(self, task: Task) -> None:
        acc = GaussianAccumulator(self.diagonal)
        for images in task.train:
            acc.add(self.embed(images)[0])
        new = acc.stats()
        rule = self.params.continual
        if rule == "refit" or self.counts.numel() == 0:
            modes = [new]
        elif rule == "multimodal":
            modes = [*self.stored_modes(), new]
        elif rule == "unimodal":
            modes = [self.stored_modes()[0].merge(new)]
        else:  # original: running uniform mean over tasks
            (old,) = self.stored_modes()
            modes = [uniform_average(old, new, int(self.tasks_merged))]
        self.tasks_merged.fill_(1 if rule == "refit" else int(self.tasks_merged) + 1)
        self.store(modes)

    @torch.no_grad()
    def shape_as_fitted(self, tasks: int) -> None:
        """One Gaussian per position (``tasks`` of them for multimodal), zero-valued."""
        probe = torch.zeros(1, 3, self.head.image_size, self.head.image_size, device=self.channel_index.device)
        _, positions, dim = self.embed(probe)[0].shape
        modes = tasks if self.params.continual == "multimodal" else 1
        shape = (modes, positions, dim) if self.diagonal else (modes, positions, dim, dim)
        self.counts = self.counts.new_ones(modes)
        self.means = torch.zeros(modes, positions, dim, device=self.channel_index.device, dtype=self.stored_dtype)
        self.shapes = torch.zeros(shape, device=self.channel_index.device, dtype=self.stored_dtype)
        self.tasks_merged.fill_(1 if self.params.continual == "refit" else tasks)

    def stored_modes(self) -> list[GaussianStats]:
        """The stored statistics back as float64 GaussianStats with biased covariances."""
        modes = []
        for count, mean, shape in zip(self.counts.tolist(), self.means, self.shapes):
            if self.diagonal:
                var = shape.double() * ((count - 1) / count if count > 1 else 1.0)
                modes.append(GaussianStats(count, mean.double(), var))
            else:
                modes.append(stats_from_whitening(count, mean, shape, self.params.epsilon))
        return modes

    def store(self, modes: list[GaussianStats]) -> None:
        eps = self.params.epsilon
        device = self.channel_index.device
        self.counts = torch.tensor([m.count for m in modes], dtype=torch.int64, device=device)
        self.means = torch.stack([m.mean for m in modes]).float()
        self.shapes = torch.empty((len(modes), *modes[0].cov.shape), device=device)
        for mode, shape in zip(modes, self.shapes):  # straight into the float32 store, chunk by chunk
            if self.diagonal:
                shape.copy_(mode.unbiased_cov())
            else:
                whitening_factor(mode, eps, out=shape)
        self.means, self.shapes = self.means.to(self.stored_dtype), self.shapes.to(self.stored_dtype)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.counts.numel() == 0:
            raise RuntimeError("PaDiM has not been fitted on any task yet")
        x, grid = self.embed(images)
        distances = []
        for mean, shape in zip(self.means.float(), self.shapes.float()):
            if self.diagonal:
                distances.append(mahalanobis_diagonal(x, mean, shape, self.params.epsilon))
            else:
                distances.append(mahalanobis_full(x, mean, shape))
        patch = torch.stack(distances).amin(dim=0) if len(distances) > 1 else distances[0]
        maps = self.head(patch.view(-1, *grid))
        return AnomalyOutput(maps.flatten(1).amax(dim=1), maps)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        backbone = list(self.backbone.parameters()) + list(self.backbone.buffers())
        return {
            "backbone": backbone,
            "gaussians": [self.counts, self.means, self.shapes, self.channel_index],
            "map_head": list(self.head.buffers()),
        }
