"""What every dataset source yields: per-category splits of image files, read as tensors.

Listing and checking files needs no torch (config validation imports this module); reading images
into tensors imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


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


def decoded_size(path: Path, what: str) -> tuple[int, int]:
    """Width and height of an image whose data is all there and intact: a header that reads is not an image
    that decodes. PNG chunks are checked against their CRCs and JPEG is decoded at 1/8 scale (a few ms each at
    1024 px); any other format is decoded whole. A DatasetError names a file that fails, and what to do."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()  # every chunk present and matching its CRC, without inflating the pixels
            else:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
            return size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct errors for broken files
        raise DatasetError(
            f"{what} {path} cannot be read as an image ({type(exc).__name__}: {exc}); replace the file or remove it"
        ) from None


def check_split(split: CategorySplit) -> None:
    """Check every image and mask of ``split`` decodes (``decoded_size``) before anything trains.

    A corrupt file, a mask whose size is not its image's, or a test set with nothing to detect
    is named now, with what to do, instead of failing (or silently skewing pixel metrics) later.
    """
    for sample in split.train:
        decoded_size(sample.image, f"training image of {split.name}:")
    for sample in split.test:
        size = decoded_size(sample.image, f"test image of {split.name}:")
        if sample.mask is not None:
            mask_size = decoded_size(sample.mask, f"mask of {split.name}:")
            if mask_size != size:
                raise DatasetError(
                    f"mask {sample.mask} is {mask_size[0]}x{mask_size[1]} px but its image {sample.image} is "
                    f"{size[0]}x{size[1]} px; a mask must match its image pixel for pixel (fix or remove the pair)"
                )
    if split.test and not any(sample.label for sample in split.test):
        raise DatasetError(
            f"the test set of {split.name} holds only good images ({len(split.test)}), so no image or pixel metric "
            f"can be measured on it; add defective test images (test/<defect type>/, with their masks) to {split.name}"
        )


def to_uint8(im: Image.Image) -> Image.Image:
    """8 bits per channel, scaled from the file's own range: 16-bit and 32-bit integer images are not
    clipped to white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))
    if im.mode == "F":
        values = np.asarray(im).astype(np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0  # floats in [0, 1], or already in 0..255
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    return im


def read_rgb(path: Path, size: int) -> torch.Tensor:
    """uint8 tensor [3, size, size]: the image resized with antialiasing (any bit depth, scaled to 8 bits)."""
    import torch

    with Image.open(path) as im:
        im = to_uint8(im).convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=None)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_mask(path: Path | None, size: int) -> torch.Tensor:
    """bool tensor [size, size]; an absent mask is all background. Any non-zero value is a defect, at any bit depth."""
    import torch

    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    with Image.open(path) as im:
        high_depth = im.mode.startswith("I") or im.mode == "F"  # 16/32-bit: class ids or levels that 8 bits would lose
        defect = np.asarray(im) != 0 if high_depth else np.asarray(im.convert("L")) > 0
    mask = Image.fromarray(defect.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 0)


class ImageDataset:
    """Samples as ``{"image": uint8 [3,S,S], "mask": bool [S,S], "label": int}``: a map-style dataset
    (``len`` and indexing) for torch's ``DataLoader`` and ``ConcatDataset``.

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
        path = sample.image
        try:
            image = read_rgb(path, self.image_size)
            path = sample.mask
            mask = read_mask(path, self.image_size)
        except Exception as exc:  # it decoded at listing (check_split): it changed or vanished since
            raise DatasetError(
                f"{path} no longer reads as an image ({type(exc).__name__}: {exc}); it decoded when the dataset was "
                "listed, so it changed or went away during the run (a copy still being written?): restore it, or "
                "remove it, and run again"
            ) from None
        return {"image": image, "mask": mask, "label": sample.label}
