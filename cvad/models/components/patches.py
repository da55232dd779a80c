"""Locally aware patch features shared by the adaptor methods (SimpleNet, CFA).

Both originals aggregate each backbone level over a small neighbourhood at the level's own
resolution first (SimpleNet's 3×3 patchify + average, CFA's 3×3 average pooling), and only then
bring the deeper levels to the finest grid and concatenate them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cvad.models.components.maps import concat_at_first_grid


def local_patch_features(maps: list[torch.Tensor], neighbourhood: int = 3) -> torch.Tensor:
    """[B, C_l, H_l, W_l] per level -> [B, ΣC_l, H_0, W_0]: each level averaged over its
    ``neighbourhood`` × ``neighbourhood`` window (stride 1, zero padding counted, grid kept),
    upsampled bilinearly to the first level's grid and concatenated."""
    if neighbourhood < 1 or neighbourhood % 2 == 0:
        raise ValueError(f"the patch neighbourhood must be a positive odd size to keep the grid, got {neighbourhood}")
    if neighbourhood == 1:
        return concat_at_first_grid(maps)
    pooled = [F.avg_pool2d(m, neighbourhood, stride=1, padding=neighbourhood // 2) for m in maps]
    return concat_at_first_grid(pooled)


def grid_rows(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B * H * W, C], one contiguous row per grid position (image-major, then row-major)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
