"""Anomaly-map overlays: what a user looks at to trust (or not) a metric.

Each PNG shows three panels side by side: the test image, the image with the ground-truth
defect outlined in green, and the anomaly map blended over the image. Maps of one task are
scaled to a common range (the minimum and maximum over that task's rendered images) so
that a weak response stays weak instead of being stretched to full colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cvad.data.base import CategorySplit, ImageDataset
from cvad.models.base import AnomalyModel

# A perceptually ordered dark-blue -> red -> yellow ramp (anchor colours, linearly interpolated).
RAMP = np.array([[0, 0, 80], [40, 0, 160], [200, 30, 70], [250, 140, 0], [255, 255, 120]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 colours."""
    position = np.clip(values, 0, 1) * (len(RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(RAMP) - 2)
    frac = (position - low)[..., None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_panels(image: np.ndarray, mask: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image [H, W, 3] uint8, mask [H, W] bool, heat [H, W] in [0, 1] -> [H, 3W, 3] uint8."""
    truth = image.copy()
    truth[outline(mask)] = (0, 255, 0)
    blended = (image.astype(np.float32) * (1 - alpha) + colorize(heat).astype(np.float32) * alpha).astype(np.uint8)
    return np.concatenate([image, truth, blended], axis=1)


@torch.inference_mode()
def write_overlays(
    model: AnomalyModel, splits: list[CategorySplit], image_size: int, device: str, out_dir: Path, per_task: int = 2
) -> list[Path]:
    """Render the first ``per_task`` defective test images of each task; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written = []
    for split in splits:
        defective = [s for s in split.test if s.label == 1][:per_task]
        if not defective:
            continue
        items = [ImageDataset(defective, image_size)[i] for i in range(len(defective))]
        images = torch.stack([item["image"] for item in items])
        maps = model(images.to(device).float().div(255.0)).anomaly_maps.float().cpu().numpy()
        low, high = float(maps.min()), float(maps.max())
        scaled = (maps - low) / (high - low) if high > low else np.zeros_like(maps)
        for k, (item, sample, heat) in enumerate(zip(items, defective, scaled)):
            panels = overlay_panels(item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy(), heat)
            path = out_dir / f"{split.name}_{k}_{sample.defect}.png"
            Image.fromarray(panels).save(path)
            written.append(path)
    return written
