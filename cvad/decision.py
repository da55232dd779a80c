"""The decision a device makes: defect or good per image, and the defect mask, at the calibrated thresholds.

One module, applied after a model's ``forward`` by the protocol's evaluation and inside the exported file,
so the metrics at the calibrated threshold are the decisions the device makes. A method that routes each
image to a task (PatchCoreCL, CL++) is judged by that task's thresholds; a single model serving every task
uses the largest of them, so no task's held-out good images were flagged above its target rate when it was
calibrated (docs/methods.md section 8).
"""

from __future__ import annotations

import torch
from torch import nn

from cvad.continual.calibration import ThresholdSet
from cvad.models.base import AnomalyOutput


class DecisionRule(nn.Module):
    """Per-step image and pixel thresholds as buffers (so they travel with ``.to()`` and into an export)."""

    def __init__(self, thresholds: ThresholdSet) -> None:
        super().__init__()
        values = thresholds.as_dict()
        self.register_buffer("image_thresholds", torch.tensor(values["image"], dtype=torch.float32))
        self.register_buffer("pixel_thresholds", torch.tensor(values["pixel"], dtype=torch.float32))

    def thresholds_for(self, output: AnomalyOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(image threshold [B], pixel threshold [B]) each image of a batch is judged by."""
        if output.routed_tasks is not None:
            return (
                self.image_thresholds.index_select(0, output.routed_tasks),
                self.pixel_thresholds.index_select(0, output.routed_tasks),
            )
        batch = output.image_scores.shape[0]
        return self.image_thresholds.max().expand(batch), self.pixel_thresholds.max().expand(batch)

    def forward(self, output: AnomalyOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(defect per image [B] bool, defect mask [B, S, S] bool)."""
        image, pixel = self.thresholds_for(output)
        return output.image_scores > image, output.anomaly_maps > pixel[:, None, None]

    def stored(self) -> list[torch.Tensor]:
        """What the device keeps to decide (counted in the detector's MB as ``thresholds``)."""
        return [self.image_thresholds, self.pixel_thresholds]
