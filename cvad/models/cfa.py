"""CFA: coupled-hypersphere-based feature adaptation (methods.md section 6).

Lee et al., "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 2022.

- Features: three frozen backbone levels (strides 4, 8, 16; WideResNet50 layer1-3 in the
  original), each averaged over its 3×3 neighbourhood, upsampled to the finest grid, concatenated.
- Patch descriptor φ (trained): CoordConv, i.e. a 1×1 convolution over the features plus two
  normalised coordinate channels, ``descriptor_dim`` wide (the original's width / gamma_d).
- Memory bank C: φ's output averaged per grid position over the training images (the original's
  initialisation), so one entry per position; with ``bank_size`` smaller than the grid, compressed
  to ``bank_size`` entries by k-means (the original's gamma_c; here Lloyd iterations from a
  seeded greedy k-center start, deterministic and cheap on a CPU). The bank is fixed while φ trains.
- Loss (the paper's; the original code's when k = j): with D the squared distance from φ(p) to
  its nearest bank entries, in ascending order, and r the hypersphere radius (a parameter learned
  with φ from ``radius``, the soft boundary of the original code),
  ``L_att = mean over patches and the k nearest of max(0, D - r²)``,
  ``L_rep = mean over patches and the next j (hard negatives) of max(0, r² - D - α)``;
  loss = L_att + L_rep. (The original multiplies by 1/ν = 1000, which Adam's updates ignore. The
  repulsion only acts once the learned r² exceeds α.)
- Inference: distances (not squared) to the k nearest entries; patch score = softmin weight of
  the nearest one times its distance; the grid is upsampled to the input size and blurred
  (σ = 4); image score = the map's maximum.

Continual learning, with the memory handled like the replay models: at each task the bank is
rebuilt, through the current φ, from the training images the task provides (the new task's;
plus the replay buffer under ``replay``; every task under ``joint``), then φ (and r) keep training
against it. Under ``finetune`` the bank therefore covers the latest task only. Its size is
bounded by the feature grid (H x W entries) and by ``bank_size``; it is stored and counted as
its own part, ``memory_bank``.

Training: defaults are a short CPU schedule for the built-in data (AdamW with AMSGrad, lr 1e-3,
weight decay 5e-4, 3 epochs). ``PAPER_TRAINING`` is the original's: AdamW with AMSGrad, lr 1e-3,
weight decay 5e-4, 30 epochs, batch 4 (set ``dataset.batch_size``), k = j = 3, r from 1e-5,
α = 0.1, gamma_c = gamma_d = 1.

Stored: the truncated backbone, the descriptor (with r), the memory bank and the map head.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from cvad.backbones import FeatureExtractor, stages_at_strides
from cvad.models.base import AnomalyModel, AnomalyOutput, Task
from cvad.models.components.coreset import DISTANCE_BLOCK, greedy_k_center, nearest
from cvad.models.components.maps import AnomalyMapHead
from cvad.models.components.patches import grid_rows, local_patch_features
from cvad.models.components.training import TrainingParams, make_optimizer, train_epochs

# Lloyd iterations stop earlier once no assignment changes (the original's scikit-learn KMeans allows 3000).
KMEANS_MAX_ITERATIONS = 100


class CFAParams(TrainingParams):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    amsgrad: bool = Field(True, description="AMSGrad variant of adam/adamw, as the original; sgd has none")
    epochs: int = Field(3, ge=1)
    feature_strides: tuple[int, ...] = Field((4, 8, 16), min_length=1, description="backbone levels, by stride")
    descriptor_dim: int | None = Field(None, ge=1, description="width of the adapted features; null: the concatenated backbone width")
    bank_size: int | None = Field(
        None, ge=1, description="most memory entries (k-means of the per-position means); null: one per feature-grid position"
    )
    k: int = Field(3, ge=1, description="nearest memory entries each feature is pulled towards (and scored against)")
    j: int = Field(3, ge=0, description="hard negatives after the k nearest, pushed out of the hypersphere")
    radius: float = Field(1e-5, ge=0, description="initial hypersphere radius r (learned with the descriptor)")
    alpha: float = Field(0.1, ge=0, description="repulsion margin α: hard negatives are pushed once r² - D exceeds it")
    blur_sigma: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def bank_holds_the_neighbours(self) -> "CFAParams":
        if self.bank_size is not None and self.bank_size < self.k + self.j:
            raise ValueError(f"bank_size {self.bank_size} is smaller than k + j = {self.k + self.j}; raise bank_size or lower k, j")
        return self


class CoordConvDescriptor(nn.Module):
    """A 1×1 convolution over the features plus their normalised row/column coordinates (CoordConv),
    so that an adapted feature also says where in the image it was."""

    def __init__(self, in_channels: int, out_channels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)
        # PyTorch's default convolution initialisation, drawn from the model's seeded stream.
        bound = 1 / math.sqrt(in_channels + 2)
        nn.init.uniform_(self.conv.weight, -bound, bound, generator=generator)
        nn.init.uniform_(self.conv.bias, -bound, bound, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        like = {"device": features.device, "dtype": features.dtype}
        rows = torch.linspace(-1, 1, h, **like).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.linspace(-1, 1, w, **like).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([features, rows, cols], dim=1))


def kmeans_centres(points: torch.Tensor, count: int, *, seed: int) -> torch.Tensor:
    """``count`` k-means centres of ``points`` [N, d]: Lloyd iterations from a seeded greedy k-center start.

    An emptied cluster keeps its previous centre; iterations stop when no assignment changes.
    """
    centres = points.index_select(0, greedy_k_center(points, count, seed=seed, projection_dim=None))
    assignment = None
    for _ in range(KMEANS_MAX_ITERATIONS):
        _, closest = nearest(points, centres)
        if assignment is not None and torch.equal(closest, assignment):
            break
        assignment = closest
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        sizes = torch.bincount(assignment, minlength=len(centres)).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
    return centres.contiguous()


class CFA(AnomalyModel):
    """CFA (see the module docstring). Defaults: a short CPU schedule for the built-in data;
    ``PAPER_TRAINING``: the original's (AdamW + AMSGrad, lr 1e-3, weight decay 5e-4, 30 epochs)."""

    name = "cfa"
    Params = CFAParams
    PAPER_TRAINING: ClassVar[dict] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "epochs": 30, "k": 3, "j": 3}

    def __init__(self, params: CFAParams, *, backbone: str, weights: str, image_size: int, seed: int) -> None:
        super().__init__()
        self.params = params
        self.seed = seed
        self.backbone = FeatureExtractor(backbone, stages_at_strides(backbone, params.feature_strides), weights)
        in_dim = sum(self.backbone.channels)
        dim = params.descriptor_dim or in_dim
        self.descriptor = CoordConvDescriptor(in_dim, dim, torch.Generator().manual_seed(seed))
        self.radius = nn.Parameter(torch.tensor(params.radius))
        self.register_buffer("memory", torch.empty(0, dim))  # [M, d], rebuilt at every task
        self.head = AnomalyMapHead(image_size, params.blur_sigma)
        self.loss_history: list[list[float]] = []

    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> adapted patch features [B, d, H, W] (gradients reach the descriptor only)."""
        with torch.no_grad():
            features = local_patch_features(self.backbone(images))
        return self.descriptor(features)

    @torch.no_grad()
    def build_memory(self, task: Task) -> None:
        """The bank from the task's images: per-position mean of the adapted features, k-means-compressed to ``bank_size``."""
        total, count = None, 0
        for images in task.train:
            batch_sum = self.describe(images).sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            count += len(images)
        if count == 0:
            raise ValueError(f"{self.name}: task {task.index + 1} ({task.name}) has no training images to build the memory from")
        memory = grid_rows((total / count).unsqueeze(0))  # [H * W, d]
        p = self.params
        if p.bank_size is not None and p.bank_size < len(memory):
            memory = kmeans_centres(memory, p.bank_size, seed=self.seed * 1000 + task.index)
        if len(memory) < p.k + p.j:
            raise ValueError(
                f"{self.name}: the feature grid gives only {len(memory)} memory entries, fewer than k + j = {p.k + p.j}; "
                "use larger images, finer feature_strides or smaller k, j"
            )
        self.memory = memory.contiguous()

    def nearest_entries(self, queries: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances [N, count] (ascending) and indices of each query's nearest bank entries.

        Distance blocks are bounded (``DISTANCE_BLOCK`` elements), never a full N x M matrix.
        """
        rows = max(1, DISTANCE_BLOCK // len(self.memory))
        distances, indices = [], []
        for block in queries.split(rows):
            found = torch.cdist(block, self.memory).topk(count, dim=1, largest=False)
            distances.append(found.values)
            indices.append(found.indices)
        return torch.cat(distances), torch.cat(indices)

    def hypersphere_loss(self, adapted: torch.Tensor) -> torch.Tensor:
        """L_att + L_rep for adapted features [N, d] (see the module docstring)."""
        p = self.params
        with torch.no_grad():  # which entries are nearest; the distances to them carry the gradient
            _, index = self.nearest_entries(adapted, p.k + p.j)
        neighbours = self.memory.index_select(0, index.flatten()).view(*index.shape, -1)  # [N, k + j, d]
        squared = (adapted.unsqueeze(1) - neighbours).square().sum(dim=-1)  # ascending, like index
        r2 = self.radius.square()
        loss = (squared[:, : p.k] - r2).clamp(min=0).mean()
        if p.j:
            loss = loss + (r2 - squared[:, p.k :] - p.alpha).clamp(min=0).mean()
        return loss

    def fit_task(self, task: Task) -> None:
        self.build_memory(task)
        p = self.params
        group = {"params": [*self.descriptor.parameters(), self.radius]}
        if p.optimizer != "sgd":
            group["amsgrad"] = p.amsgrad
        optimizer = make_optimizer(p, [group])

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            return self.hypersphere_loss(grid_rows(self.describe(images)))

        self.loss_history.append(train_epochs(task, p, optimizer, loss_of, method=self.name))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.memory.numel() == 0:
            raise RuntimeError(f"{self.name}: the memory bank is empty; fit a task (fit_task) before scoring images")
        adapted = self.describe(images)
        b, _, h, w = adapted.shape
        distances, _ = self.nearest_entries(grid_rows(adapted), self.params.k)
        patch_scores = F.softmin(distances, dim=1)[:, 0] * distances[:, 0]
        maps = self.head(patch_scores.view(b, h, w))
        return AnomalyOutput(maps.flatten(1).amax(dim=1), maps)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            "backbone": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "descriptor": [*self.descriptor.parameters(), self.radius],
            "memory_bank": [self.memory],
            "map_head": list(self.head.buffers()),
        }
