"""SimpleNet: a discriminator between adapted normal features and noised ones (docs/methods.md section 6).

Frozen backbone features at two levels (strides 8 and 16 by default, as WideResNet's layer 2
and 3 in the original), each averaged over its 3×3 neighbourhood and brought to the finer grid,
concatenated, then a trainable linear adaptor. Fake anomalous features are the adapted features
plus Gaussian noise (σ = ``noise_std``); a small MLP discriminator (Linear, BatchNorm, LeakyReLU 0.2,
Linear) learns to score normal features above ``threshold`` and fakes below ``-threshold``
with the truncated L1 loss max(0, th − D(normal)) + max(0, th + D(fake)). Score = −D per
patch, upsampled and blurred (σ = 4); image score = the map's maximum.

Defaults are a CPU-sized schedule for the built-in data: 80 updates per task, σ = 0.1. The
original's σ = 0.015 is tuned to WideResNet features; next to MobileNetV2's wider-ranging ones it
is too small for the discriminator to learn a boundary (joint training on the built-in stream,
500 updates: pixel / image ROC-AUC 0.904 / 0.848 at σ = 0.015, 0.992 / 0.984 at σ = 0.1).
``PAPER_TRAINING`` is the original's (Adam, discriminator lr 2e-4, adaptor lr 1e-4, weight decay
1e-5, 160 epochs, batch 8, σ = 0.015; the original's discriminator is 1,024 wide, the paper's as
wide as its features, see ``paper_preset``). The backbone's outputs for a training image are
computed once (``FrozenOutputs``), not once per update.

Stored: the truncated backbone, the adaptor, the discriminator and the map head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cvad.backbones import FeatureExtractor
from cvad.methods.simplenet import SimpleNetParams, SimpleNetSpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.frozen import FrozenOutputs, extractor_digest
from cvad.models.components.maps import AnomalyMapHead, concat_at_first_grid
from cvad.models.components.training import make_optimizer, train_loop
from cvad.runtime import step_seed


class SimpleNet(SimpleNetSpec, AnomalyModel):
    params: SimpleNetParams

    def __init__(self, params: SimpleNetParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.backbone = FeatureExtractor(setup.backbone, params.layers, setup.weights)
        dim = sum(self.backbone.channels)
        self.adaptor = nn.Linear(dim, dim)
        self.discriminator = nn.Sequential(
            nn.Linear(dim, params.hidden), nn.BatchNorm1d(params.hidden), nn.LeakyReLU(0.2), nn.Linear(params.hidden, 1)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(setup.seed)
            nn.init.xavier_normal_(self.adaptor.weight)
            for layer in self.discriminator:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_normal_(layer.weight)
        self.head = AnomalyMapHead(setup.image_size, params.blur_sigma)
        self.loss_history: list[list[float]] = []

    def patch_features(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Backbone maps -> adapted patch features [B*P, d] and the patch grid."""
        with torch.no_grad():
            features = concat_at_first_grid([F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps])
        grid = tuple(features.shape[-2:])
        return self.adaptor(features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])), grid

    def truncated_l1(self, true_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """max(0, th - D(normal)) + max(0, th + D(fake)), each averaged: zero once both clear the margin."""
        th = self.params.threshold
        return (th - true_scores).clamp(min=0).mean() + (th + fake_scores).clamp(min=0).mean()

    def fit_task(self, task: Task) -> None:
        groups = [
            {"params": self.discriminator.parameters()},
            {"params": self.adaptor.parameters(), "lr": self.params.lr * self.params.adaptor_lr_ratio},
        ]
        optimizer = make_optimizer(self.params, groups)
        noise_source = torch.Generator().manual_seed(step_seed(self.setup.seed, task.index))
        frozen = FrozenOutputs(self.backbone, extractor_digest(self.backbone), task.features)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            normal, _ = self.patch_features(frozen(images))
            noise = torch.randn(normal.shape, generator=noise_source).to(normal.device) * self.params.noise_std
            scores = self.discriminator(torch.cat([normal, normal + noise])).squeeze(1)
            return self.truncated_l1(scores[: len(normal)], scores[len(normal) :])

        self.loss_history.append(train_loop(self, task, optimizer, loss_of))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        features, grid = self.patch_features(self.backbone(images))
        patch_scores = -self.discriminator(features).view(images.shape[0], *grid)
        maps = self.head(patch_scores)
        return AnomalyOutput(maps.flatten(1).amax(dim=1), maps)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            "backbone": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "adaptor": list(self.adaptor.parameters()),
            "discriminator": list(self.discriminator.parameters()) + list(self.discriminator.buffers()),
            "map_head": list(self.head.buffers()),
        }
