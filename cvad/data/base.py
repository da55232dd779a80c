"""What every dataset source yields: per-category splits of image files, read as tensors.

Listing and checking files needs no torch (config validation imports this module); reading images
into tensors imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

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


WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})  # more than 8 bits a value: scaled by ``to_uint8``
IMAGE_MODES = WIDE_MODES | {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}  # read as RGB, true colours
MASK_MODES = WIDE_MODES | {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX"}  # modes whose 0 is black: "no defect"
JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: the multi-picture JPEG many cameras write
WIDEST = {"I": 65535.0, "F": 255.0}  # the largest value ``to_uint8`` scales from: 16-bit data, or floats of 0..255


@dataclass(frozen=True)
class ImageFile:
    """What the listing check learned of a file whose data all decodes."""

    size: tuple[int, int]
    mode: str
    format: str | None
    out_of_range: str | None  # a 32-bit integer or float image whose values ``to_uint8`` cannot scale: which ones


def what_is_wrong(path: Path, error: BaseException) -> str:
    """Why ``path`` failed to open or decode, and what to do, in words: each kind of broken file has its own."""
    if os.path.islink(path) and not path.exists():
        return f"it is a link to {os.readlink(path)}, which does not exist; restore its target or remove the link"
    if path.is_dir():
        return "it is a folder named like an image; rename it or move it out of the dataset"
    if isinstance(error, FileNotFoundError):
        return "it no longer exists; restore it, or remove it from the dataset (and from a split file that names it)"
    if isinstance(error, PermissionError):
        return "permission to read it is denied; make it readable (chmod a+r) or remove it"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes); replace the file or remove it"
    if isinstance(error, UnidentifiedImageError):
        with open(path, "rb") as handle:
            head = handle.read(16)
        return f"it holds no image format Pillow knows (it starts {head!r}); replace the file or remove it"
    return (
        f"its header reads but its data does not decode ({type(error).__name__}: {error}): it is cut short or "
        "corrupt; replace the file or remove it"
    )


def values_out_of_range(im: Image.Image) -> str | None:
    """For a 32-bit integer or float image, the values ``to_uint8`` would have to clip, in words; None when all fit."""
    widest = WIDEST.get(im.mode)
    if widest is None:
        return None
    values = np.asarray(im)
    if not np.isfinite(values).all():
        return "holds NaN or infinite values"
    low, high = float(values.min(initial=0)), float(values.max(initial=0))
    return None if 0 <= low and high <= widest else f"holds values from {low:g} to {high:g}, outside 0..{widest:g}"


def decoded(path: Path, what: str) -> ImageFile:
    """The facts of an image whose data is all there and intact: a header that reads is not an image that decodes.

    PNG chunks are checked against their CRCs (a file cut anywhere before its end lacks one) and JPEG is decoded at
    1/8 scale: about 1 ms a file at 1024 px, against 16 ms to decode a PNG whole (``bench`` figures in README). Any
    other format, and images of 32-bit values (whose range is checked), are decoded whole. A DatasetError names a
    file that fails, what is wrong with it and what to do."""
    try:
        with Image.open(path) as im:
            facts = (im.size, im.mode, im.format)
            if im.format == "PNG" and im.mode not in WIDEST:
                im.verify()  # every chunk present and matching its CRC, without inflating the pixels
                return ImageFile(*facts, None)
            if im.format in JPEG_FORMATS:
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
            return ImageFile(*facts, values_out_of_range(im))
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct errors for broken files
        raise DatasetError(f"{what} {path} cannot be read as an image: {what_is_wrong(path, exc)}") from None


def check_image(path: Path, what: str) -> ImageFile:
    """``decoded``, and refused unless ``read_rgb`` turns it into the picture it holds (its mode, its value range)."""
    image = decoded(path, what)
    if image.mode not in IMAGE_MODES:
        raise DatasetError(
            f"{what} {path} is a {image.mode} image, which cvad does not read as RGB; save it as an RGB or grey "
            "image (8 or 16 bits a channel)"
        )
    if image.out_of_range is not None:
        raise DatasetError(
            f"{what} {path} is a {image.mode} ({'float' if image.mode == 'F' else '32-bit integer'}) image that "
            f"{image.out_of_range}; cvad scales 32-bit integers from 0..65535 and floats from 0..1 or 0..255, so it "
            "would clip them: save it as an 8- or 16-bit image"
        )
    return image


def check_mask(path: Path, what: str) -> ImageFile:
    """``decoded``, and refused unless ``read_mask``'s rule (any non-zero value is a defect) reads it as drawn."""
    mask = decoded(path, what)
    if mask.format in JPEG_FORMATS:
        raise DatasetError(
            f"{what} {path} is a JPEG: its lossy compression leaves faint non-zero pixels around a defect, and any "
            "non-zero pixel counts as defect; save masks as PNG (0 = good, non-zero = defect)"
        )
    if mask.mode not in MASK_MODES:
        raise DatasetError(
            f"{what} {path} is a {mask.mode} image, in which 0 is not black, so no defect can be read from it; save "
            "masks as grey, palette or RGB PNG (0 = good, non-zero = defect)"
        )
    return mask


def check_split(split: CategorySplit) -> None:
    """Check every image and mask of ``split`` decodes and reads as drawn before anything trains.

    A broken file, an image or mask cvad would misread, a mask whose size is not its image's, or a test set with
    nothing to detect is named now, with what to do, instead of failing (or silently skewing metrics) later.
    """
    for sample in split.train:
        check_image(sample.image, f"training image of {split.name}:")
    for sample in split.test:
        size = check_image(sample.image, f"test image of {split.name}:").size
        if sample.mask is not None:
            mask_size = check_mask(sample.mask, f"mask of {split.name}:").size
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
    clipped to white (``check_image`` refuses values beyond what this scales)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8))
    if im.mode == "F":
        values = np.asarray(im).astype(np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0  # floats in [0, 1], or already in 0..255
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    return im


def defect_pixels(im: Image.Image) -> np.ndarray:
    """Where a mask marks a defect: any non-zero value, at any bit depth; in a colour or palette mask any non-zero
    colour channel (the colour shown, whatever the palette's order), except where the mask is fully transparent."""
    if im.mode in WIDE_MODES or im.mode in ("1", "L"):
        return np.asarray(im) != 0
    rgba = np.asarray(im.convert("RGBA"))
    return rgba[..., :3].any(axis=-1) & (rgba[..., 3] > 0)


def read_pixels(path: Path, what: str, pixels: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """``pixels`` of the image file at ``path``. A file that cannot be read here was readable when its stream was
    listed, so it changed since (deleted, cut short, made unreadable) or is broken where only a full decode looks:
    a DatasetError names it, what is wrong and what to do."""
    try:
        with Image.open(path) as im:
            return pixels(im)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct errors for broken files
        raise DatasetError(
            f"{what} {path} cannot be read as an image any more: {what_is_wrong(path, exc)}. It passed the check when "
            "its stream was listed, so it changed since or is broken where only a full decode looks; run again "
            "once it is fixed"
        ) from None


def read_rgb(path: Path, size: int) -> torch.Tensor:
    """uint8 tensor [3, size, size]: the image resized with antialiasing (any bit depth, scaled to 8 bits)."""
    import torch

    def resized(im: Image.Image) -> np.ndarray:
        im = to_uint8(im).convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.array(im, dtype=np.uint8)

    return torch.from_numpy(read_pixels(path, "image", resized)).permute(2, 0, 1).contiguous()


def read_mask(path: Path | None, size: int) -> torch.Tensor:
    """bool tensor [size, size]; an absent mask is all background. Any non-zero value is a defect (``defect_pixels``)."""
    import torch

    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    defect = read_pixels(path, "mask", defect_pixels)
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
        return {
            "image": read_rgb(sample.image, self.image_size),
            "mask": read_mask(sample.mask, self.image_size),
            "label": sample.label,
        }
