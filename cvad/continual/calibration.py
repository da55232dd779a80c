"""Decision thresholds from defect-free images training did not see (docs/methods.md section 8).

F1-max picks its threshold on the test labels, which no device has. Here each task holds out a
seeded share of its ``train/good`` images; after the step that learns the task, the model scores
them and the task's image and pixel thresholds are set so that at most the target share of those
good images (pixels) lies above them. A task with too few images is refused before training.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from cvad.config import CalibrationConfig
from cvad.data.base import CategorySplit, DatasetError, ImageDataset, Sample
from cvad.models.base import AnomalyModel


def held_out_count(images: int, share: float) -> int:
    """Images a task of ``images`` training images holds out: the share, rounded, at least one, never all."""
    if share <= 0:
        return 0
    return min(images - 1, max(1, round(share * images)))


def holdout_split(split: CategorySplit, calibration: CalibrationConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples) of a task, in file order.

    Drawn from the run's seed and the task's name alone, so a task is held out the same way wherever it
    sits in a stream and whether it is learned by ``cvad run`` or ``cvad learn``.
    """
    count = held_out_count(len(split.train), calibration.holdout)
    if count == 0:
        return list(split.train), []
    order = np.random.default_rng([seed, zlib.crc32(split.name.encode())]).permutation(len(split.train))
    held = set(order[:count].tolist())
    train = [s for i, s in enumerate(split.train) if i not in held]
    return train, [s for i, s in enumerate(split.train) if i in held]


def check_holdout(splits: list[CategorySplit], calibration: CalibrationConfig) -> None:
    """Refuse, before anything trains, a task whose held-out share is too small to calibrate on."""
    if not calibration.enabled:
        return
    for split in splits:
        count = held_out_count(len(split.train), calibration.holdout)
        if len(split.train) < 2 or count < calibration.min_images:
            raise DatasetError(
                f"task {split.name} has {len(split.train)} training images; calibration.holdout "
                f"{calibration.holdout:g} holds out {count}, fewer than calibration.min_images "
                f"({calibration.min_images}) to set its thresholds on: add good images to {split.name}, raise "
                "calibration.holdout, lower calibration.min_images (thresholds from fewer images are coarser), "
                "or set calibration.holdout: 0 to train on every image and keep no thresholds"
            )


def upper_threshold(scores: np.ndarray, fpr: float) -> float:
    """The (floor(fpr * n) + 1)-th largest of n good scores: at most ``fpr`` of them lie strictly above it."""
    n = scores.size
    above = math.floor(fpr * n + 1e-9)  # the tolerance keeps 0.29 * 100 at 29
    return float(np.partition(scores, n - 1 - above)[n - 1 - above])


@dataclass
class Thresholds:
    """A step's decision thresholds: a score above ``image`` flags the image, a pixel above ``pixel`` the pixel."""

    image: float
    pixel: float


@dataclass
class ThresholdSet:
    """The thresholds of every step learned, in order (the device keeps these: 8 bytes a step)."""

    steps: list[Thresholds] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"image": [t.image for t in self.steps], "pixel": [t.pixel for t in self.steps]}

    @classmethod
    def from_dict(cls, content: dict) -> ThresholdSet:
        return cls([Thresholds(float(i), float(p)) for i, p in zip(content["image"], content["pixel"])])


@torch.inference_mode()
def calibrate(
    model: AnomalyModel,
    samples: list[Sample],
    image_size: int,
    batch_size: int,
    device: str,
    calibration: CalibrationConfig,
) -> Thresholds:
    """Thresholds at the configured false-positive rates on held-out good ``samples``, under ``model`` as it is now."""
    model.eval()
    image_scores, pixel_scores = [], []
    for batch in DataLoader(ImageDataset(samples, image_size), batch_size=batch_size):
        output = model(batch["image"].to(device).float().div_(255.0))
        image_scores.append(output.image_scores.float().cpu().numpy())
        pixel_scores.append(output.anomaly_maps.float().cpu().numpy().reshape(-1))
    return Thresholds(
        upper_threshold(np.concatenate(image_scores), calibration.image_fpr),
        upper_threshold(np.concatenate(pixel_scores), calibration.pixel_fpr),
    )
