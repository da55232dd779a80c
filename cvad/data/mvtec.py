"""Readers for the MVTec AD folder layout, used by MVTec AD itself and by look-alike datasets.

Layout per category::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import os
from pathlib import Path

from cvad.data.base import CategorySplit, DatasetError, Sample

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})  # compared lower-cased
GOOD = "good"
MASK_SUFFIX = "_mask.png"


def list_images(folder: Path) -> list[Path]:
    """Entries named like images directly inside ``folder``, sorted by name; hidden and other files are skipped.

    A link to nothing or a folder named like an image is listed too, so that the decode check names it rather
    than the stream silently losing an image."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def list_subfolders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class MVTecAD:
    """Reader for the MVTec AD layout; every defective test image must have its mask."""

    def __init__(self, root: str | Path, *, require_masks: bool = True) -> None:
        self.root = Path(root)
        self.require_masks = require_masks
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {self.root} does not exist or is not a folder; "
                "pass the folder that holds one sub-folder per category"
            )

    def categories(self) -> list[str]:
        """Category folders present under the root, sorted."""
        return [p.name for p in list_subfolders(self.root)]

    def load(self, category: str) -> CategorySplit:
        """Defect-free training images and the labelled test set of one category."""
        available = self.categories()
        if category not in available:
            raise DatasetError(
                f"unknown category {category!r}: no folder {self.root / category}; "
                f"available under {self.root}: {', '.join(available) or 'none'}"
            )
        folder = self.root / category
        train = tuple(Sample(image, 0, GOOD) for image in self._train_images(folder))
        good, defective = self._test_images(folder)
        masks_dir = folder / "ground_truth"
        has_masks = self.require_masks or masks_dir.is_dir()
        masks = self._pair_masks(masks_dir, defective) if has_masks else [None] * len(defective)
        test = [Sample(image, 0, GOOD) for image in good]
        test += [Sample(image, 1, defect, mask) for (defect, image), mask in zip(defective, masks)]
        return CategorySplit(category, train, tuple(test), has_masks)

    @staticmethod
    def _train_images(folder: Path) -> list[Path]:
        train_dir = folder / "train" / GOOD
        if not train_dir.is_dir():
            raise DatasetError(f"missing folder {train_dir}: put the defect-free training images there")
        images = list_images(train_dir)
        if not images:
            raise DatasetError(
                f"{train_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "put the defect-free training images there"
            )
        return images

    @staticmethod
    def _test_images(folder: Path) -> tuple[list[Path], list[tuple[str, Path]]]:
        """Good test images and (defect type, image) pairs, in folder then file-name order."""
        test_dir = folder / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"missing folder {test_dir}: put test images in test/good/ and test/<defect type>/")
        good: list[Path] = []
        defective: list[tuple[str, Path]] = []
        for sub in list_subfolders(test_dir):
            if sub.name == GOOD:
                good += list_images(sub)
            else:
                defective += [(sub.name, image) for image in list_images(sub)]
        if not good and not defective:
            raise DatasetError(f"{test_dir} has no images in test/good/ or test/<defect type>/")
        return good, defective

    def _pair_masks(self, masks_dir: Path, defective: list[tuple[str, Path]]) -> list[Path]:
        """The mask of each defective image; refuses missing masks and masks without an image."""
        masks = [masks_dir / defect / f"{image.stem}{MASK_SUFFIX}" for defect, image in defective]
        for (_, image), mask in zip(defective, masks):
            if not os.path.lexists(mask):  # a broken mask file (even a dead link) is named by the decode check
                remedy = "add the mask or remove the image"
                if not masks_dir.is_dir():
                    remedy += "; or read the dataset with FolderDataset, which accepts no ground_truth/"
                elif not self.require_masks:
                    remedy += f"; or delete {masks_dir} to load the category without masks (all or none)"
                raise DatasetError(f"defective image {image} has no mask {mask}; {remedy}")
        if masks_dir.is_dir():
            expected = set(masks)
            test_dir = masks_dir.parent / "test"
            for defect_dir in list_subfolders(masks_dir):
                for mask in list_images(defect_dir):
                    if mask not in expected:
                        stem = mask.stem.removesuffix("_mask")
                        raise DatasetError(
                            f"mask {mask} has no image {stem}.* in {test_dir / defect_dir.name}; masks are "
                            f"named <image stem>{MASK_SUFFIX}: restore the image or remove the mask"
                        )
        return masks


class FolderDataset(MVTecAD):
    """Any dataset in the MVTec layout; a category without ground_truth/ loads with has_masks=False.

    Masks stay all-or-nothing per category: a partial ground_truth/ is an error, because
    pixel metrics over a subset of the defects would be silently biased.
    """

    def __init__(self, root: str | Path, *, require_masks: bool = False) -> None:
        super().__init__(root, require_masks=require_masks)
