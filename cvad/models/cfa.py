"""CFA: coupled-hypersphere feature adaptation (docs/methods.md section 6).

Frozen backbone levels (strides 4, 8, 16) concatenated at the finest grid go through a
trainable patch descriptor (CoordConv: the features plus two coordinate channels, then a 1×1
convolution). The memory of normal features is the descriptor's output averaged per position
over the task's training images (the original's initialisation), optionally compressed to
positions / ``compression`` entries chosen by greedy k-center. Training pulls each adapted
feature inside a hypersphere of radius r around its ``k`` nearest memory features and pushes its next ``j``
(hard negatives) beyond r + α. Score per patch = the softmin-weighted distance to the nearest
memory feature; the map is upsampled and blurred (σ = 4); image score = its maximum away from
the border (``score_margin``, 16 px = 4 stride-4 cells): the backbone's zero padding makes the
outermost features unlike every memory entry, so on normal images the corners scored highest and
decided the image score (image ROC-AUC 0.50 and 0.79 on built-in brick and hex nut with pixel
ROC-AUC 0.997; 1.00 and 1.00 without the border). Training draws ``train_patches`` patches per
image for each update (seeded): the hypersphere loss is a mean over patches, and every patch
against a 3,136-entry memory cost 3.6 s per update of 16 images on 2 cores.

Continual learning, handled like the replay models: at each task the memory is rebuilt from
the images the task provides (the new task; plus the replay buffer under ``replay``; every
task under ``joint``) and the same descriptor keeps training. Under ``finetune`` the memory
therefore covers the latest task only. The memory is stored (part ``memory_bank``) and its
size is bounded: grid positions / ``compression`` entries.

Defaults are a CPU-friendly schedule for the built-in data; ``PAPER_TRAINING`` is the
original's as far as the shared optimisers go (the original: AdamW with AMSGrad, lr 1e-3, weight
decay 5e-4, 30 epochs, batch 4; cvad has no AMSGrad switch and the batch is ``dataset.batch_size``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvad.backbones import FeatureExtractor
from cvad.methods.cfa import CFAParams, CFASpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.coreset import greedy_k_center
from cvad.models.components.frozen import FrozenOutputs, extractor_digest
from cvad.models.components.maps import AnomalyMapHead, concat_at_first_grid
from cvad.models.components.stored import StoredMatrix, codec_for
from cvad.models.components.training import make_optimizer, train_loop
from cvad.runtime import step_seed


class CoordConvDescriptor(nn.Module):
    """Features plus normalised x/y coordinate channels, through a 1×1 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 2, channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = features.shape
        ys = torch.linspace(-1, 1, h, device=features.device).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=features.device).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([features, xs, ys], dim=1))


class CFA(CFASpec, AnomalyModel):
    params: CFAParams

    def __init__(self, params: CFAParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.backbone = FeatureExtractor(setup.backbone, params.layers, setup.weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(setup.seed)
            self.descriptor = CoordConvDescriptor(sum(self.backbone.channels))
        self.head = AnomalyMapHead(setup.image_size, params.blur_sigma)
        # The memory, kept as the run's compression.memory says (buffer "memory", plus its scales under int8).
        self.stored_memory = StoredMatrix(self, "memory", codec_for(setup.compression.memory))
        self.loss_history: list[list[float]] = []

    def describe(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Backbone maps -> adapted patch features [B, P, d] and the grid."""
        with torch.no_grad():
            features = concat_at_first_grid(maps)
        adapted = self.descriptor(features)
        return adapted.flatten(2).transpose(1, 2), tuple(adapted.shape[-2:])

    @torch.no_grad()
    def build_memory(self, task: Task, frozen: FrozenOutputs) -> None:
        """Average adapted feature per position over the task's images, then optional compression."""
        total, count = None, 0
        for images in task.train:
            features, _ = self.describe(frozen(images))
            total = features.sum(dim=0) if total is None else total + features.sum(dim=0)
            count += len(images)
        memory = total / count
        keep = self.memory_entries(len(memory))
        if keep < len(memory):
            memory = memory.index_select(0, greedy_k_center(memory, keep, seed=self.setup.seed, projection_dim=None))
        self.stored_memory.put(self.stored_memory.codec.encode(memory))

    @torch.no_grad()
    def shape_as_fitted(self, tasks: int) -> None:
        """A memory of the size one build leaves (it is rebuilt per task, so ``tasks`` does not change it)."""
        probe = torch.zeros(1, 3, self.head.image_size, self.head.image_size, device=self.head.blur.kernel.device)
        features, _ = self.describe(self.backbone(probe))
        self.stored_memory.put(
            self.stored_memory.codec.zeros(self.memory_entries(features.shape[1]), features.shape[-1], features)
        )

    def memory_entries(self, positions: int) -> int:
        """Entries kept of a memory with one per grid position: 1 in ``compression``."""
        return max(1, positions // self.params.compression)

    def nearest_distances(self, features: torch.Tensor, count: int) -> torch.Tensor:
        """Squared distances of [B, P, d] features to their ``count`` nearest memory entries, ascending."""
        memory = self.stored_memory.decoded()
        distances = torch.cdist(features, memory.unsqueeze(0).expand(features.shape[0], -1, -1)).pow(2)
        return distances.topk(min(count, len(memory)), dim=-1, largest=False).values

    def fit_task(self, task: Task) -> None:
        sampler = torch.Generator().manual_seed(step_seed(self.setup.seed, task.index))
        frozen = FrozenOutputs(self.backbone, extractor_digest(self.backbone), task.features)
        self.build_memory(task, frozen)
        p = self.params
        optimizer = make_optimizer(p, list(self.descriptor.parameters()))
        r2 = p.radius**2

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            features, _ = self.describe(frozen(images))
            if p.train_patches is not None and p.train_patches < features.shape[1]:
                # The loss is a mean over patches: a seeded random subset estimates it at a fraction of the cost.
                keep = torch.randperm(features.shape[1], generator=sampler)[: p.train_patches].to(features.device)
                features = features.index_select(1, keep)
            nearest = self.nearest_distances(features, p.k + p.j)
            attract = (nearest[..., : p.k] - r2).clamp(min=0).mean()
            if p.j == 0 or nearest.shape[-1] <= p.k:
                return attract
            repel = (r2 - nearest[..., p.k :] + p.alpha).clamp(min=0).mean()
            return attract + repel

        self.loss_history.append(train_loop(self, task, optimizer, loss_of))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.stored_memory.empty:
            raise RuntimeError("CFA has not been fitted on any task yet")
        features, grid = self.describe(self.backbone(images))
        nearest = self.nearest_distances(features, self.params.k)
        patch = F.softmin(nearest, dim=-1)[..., 0] * nearest[..., 0]
        maps = self.head(patch.view(images.shape[0], *grid))
        m = self.params.score_margin
        inner = maps[:, m : maps.shape[1] - m, m : maps.shape[2] - m] if m else maps
        return AnomalyOutput(inner.flatten(1).amax(dim=1), maps)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            "backbone": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "descriptor": list(self.descriptor.parameters()),
            "memory_bank": self.stored_memory.tensors(),
            "map_head": list(self.head.buffers()),
        }
