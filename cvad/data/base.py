"""What every dataset source yields: per-category splits of image files, read as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A dataset folder that is missing parts or malformed; the message names the path."""


@dataclass(frozen=True)
class Sample:
    """One image file with its label and, for defective images, its mask file."""

    image: Path
    label: int  # 0 = good, 1 = defective
    defect: str  # "good" or the defect type
    mask: Path | None = None  # None for good images, or when the dataset ships no masks


@dataclass(frozen=True)
class CategorySplit:
    """One category (one continual task): defect-free training images and a labelled test set."""

    name: str
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    has_masks: bool  # False: pixel metrics are unavailable for this category


def read_rgb(path: Path, size: int) -> torch.Tensor:
    """uint8 tensor [3, size, size]: the image resized with antialiasing."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=None)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: Path | None, size: int) -> torch.Tensor:
    """bool tensor [size, size]; an absent mask is all background."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    with Image.open(path) as im:
        im = im.convert("L").resize((size, size), Image.NEAREST)
        arr = np.asarray(im) > 0
    return torch.from_numpy(arr.copy())


class ImageDataset(Dataset):
    """Samples as ``{"image": uint8 [3,S,S], "mask": bool [S,S], "label": int}``.

    Images stay uint8 here: replay buffers store exactly these bytes, and models
    normalise inside their own inference path.
    """

    def __init__(self, samples: tuple[Sample, ...] | list[Sample], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            "image": read_rgb(sample.image, self.image_size),
            "mask": read_mask(sample.mask, self.image_size),
            "label": sample.label,
        }
