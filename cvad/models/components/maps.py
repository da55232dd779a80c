"""Feature-map plumbing shared by the patch-level methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def concat_at_first_grid(maps: list[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """Upsample every map to the first (finest) one's grid (``"bilinear"`` or ``"nearest"``) and stack channels."""
    size = maps[0].shape[-2:]
    options = {"align_corners": False} if mode == "bilinear" else {}
    resized = [maps[0]] + [F.interpolate(m, size=size, mode=mode, **options) for m in maps[1:]]
    return torch.cat(resized, dim=1)


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of [B, H, W] maps (edge-replicating padding), truncated at 4 sigma."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        radius = math.ceil(4 * sigma)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)
        self.radius = radius

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps.unsqueeze(1)
        k = self.kernel
        x = F.conv2d(F.pad(x, (self.radius, self.radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, self.radius, self.radius), mode="replicate"), k.view(1, 1, -1, 1))
        return x.squeeze(1)


class AnomalyMapHead(nn.Module):
    """Patch-grid scores -> input-size map (bilinear, then Gaussian blur)."""

    def __init__(self, image_size: int, sigma: float = 4.0) -> None:
        super().__init__()
        self.image_size = image_size
        self.blur = GaussianBlur(sigma)

    def forward(self, patch_scores: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(
            patch_scores.unsqueeze(1), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        return self.blur(up.squeeze(1))
