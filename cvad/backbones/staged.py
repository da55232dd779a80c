"""Base of the edge networks written here: a stem, stages that end at each resolution, a head."""

from __future__ import annotations

import torch
from torch import nn


class StagedNetwork(nn.Module):
    """Subclasses set ``stem``, ``stages`` (an nn.ModuleList) and ``classifier`` (None when truncated)."""

    stem: nn.Module
    stages: nn.ModuleList
    classifier: nn.Module | None

    def record_layout(self, stages: list, stem_stride: int = 2) -> None:
        """Set ``stage_channels``/``stage_strides`` from per-stage block specs (``out_channels``, ``stride``)."""
        self.stage_channels: list[int] = [specs[-1].out_channels for specs in stages]
        self.stage_strides: list[int] = []
        stride = stem_stride
        for specs in stages:
            for spec in specs:
                stride *= spec.stride
            self.stage_strides.append(stride)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature map at the end of every built stage, shallowest first."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images shaped (N, 3, H, W), got {tuple(x.shape)}")
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits; only the full network (``num_stages=None``) has a classifier."""
        if self.classifier is None:
            raise RuntimeError(
                f"this {type(self).__name__} was built with num_stages={len(self.stages)} "
                "and has no classifier; call forward_stages()"
            )
        return self.classifier(self.forward_stages(x)[-1].mean(dim=(2, 3)))
