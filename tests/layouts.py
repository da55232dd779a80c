"""Tiny dataset folders in the exact on-disk layouts of MVTec AD and VisA, for tests.

Every defective image carries a dark square (a stain) at ``defect_box``; its mask marks the same
square, so tests can check that images and masks line up after loading.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

GRAYSCALE_MVTEC = frozenset({"grid", "screw", "zipper"})  # shipped as single-channel PNGs
VISA_MASK_CLASS_IDS = (1, 2)  # VisA masks store a class id per defect pixel, not 255


def defect_box(height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the defect square painted into every defective image."""
    return slice(height // 4, height // 2), slice(width // 4, width // 2)


def _normal_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient with mild noise: a plausible defect-free surface, [H, W, 3] uint8."""
    rows = np.linspace(40, 160, height)[:, None, None]
    cols = np.linspace(20, 120, width)[None, :, None]
    base = rows + cols * np.array([1.0, 0.6, 0.3])
    noise = rng.normal(0.0, 4.0, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _defective_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    pixels = _normal_pixels(rng, height, width)
    pixels[defect_box(height, width)] = (15, 12, 10)
    return pixels


def _defect_mask(height: int, width: int, value: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[defect_box(height, width)] = value
    return Image.fromarray(mask)


def _save(pixels: np.ndarray, path: Path, *, grayscale: bool = False, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert("L") if grayscale else image).save(path, **options)


def make_mvtec_tree(
    root: Path,
    categories: tuple[str, ...] = ("bottle", "wood"),
    *,
    n_train: int = 3,
    n_test_good: int = 2,
    defects: tuple[str, ...] = ("crack",),
    n_defect: int = 2,
    size: int = 32,
    masks: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``.

    Files are named 000.png, 001.png, ... and masks 000_mask.png (0/255), as in MVTec AD;
    grid, screw and zipper are grayscale as in the real dataset. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")  # the real archive ships loose files at the root
    for category in categories:
        folder = root / category
        gray = category in GRAYSCALE_MVTEC
        for index in range(n_train):
            _save(
                _normal_pixels(rng, size, size),
                folder / "train" / "good" / f"{index:03d}.png",
                grayscale=gray,
            )
        for index in range(n_test_good):
            _save(_normal_pixels(rng, size, size), folder / "test" / "good" / f"{index:03d}.png", grayscale=gray)
        for defect in defects:
            for index in range(n_defect):
                _save(
                    _defective_pixels(rng, size, size),
                    folder / "test" / defect / f"{index:03d}.png",
                    grayscale=gray,
                )
                if masks:
                    mask_path = folder / "ground_truth" / defect / f"{index:03d}_mask.png"
                    mask_path.parent.mkdir(parents=True, exist_ok=True)
                    _defect_mask(size, size, 255).save(mask_path)
    return root


def make_visa_tree(
    root: Path,
    categories: tuple[str, ...] = ("candle", "pcb1"),
    *,
    n_train: int = 3,
    n_test_normal: int = 2,
    n_anomaly: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write VisA's layout: ``<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
    ``<category>/Data/Masks/Anomaly/*.png`` and ``split_csv/1cls.csv``.

    Images are ``size`` high and 1.5 x ``size`` wide (VisA images are landscape); normal
    files are 0000.JPG.., anomalies 000.JPG.. with masks 000.png holding class ids. Rows of
    the split file are shuffled, as in the real file. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    height, width = size, size + size // 2
    rows: list[tuple[str, str, str, str, str]] = []
    for category in categories:
        data = Path(category) / "Data"
        for index in range(n_train + n_test_normal):
            image = data / "Images" / "Normal" / f"{index:04d}.JPG"
            _save(_normal_pixels(rng, height, width), root / image, format="JPEG", quality=95)
            rows.append((category, "train" if index < n_train else "test", "normal", image.as_posix(), ""))
        for index in range(n_anomaly):
            image = data / "Images" / "Anomaly" / f"{index:03d}.JPG"
            mask = data / "Masks" / "Anomaly" / f"{index:03d}.png"
            _save(_defective_pixels(rng, height, width), root / image, format="JPEG", quality=95)
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            _defect_mask(height, width, VISA_MASK_CLASS_IDS[index % len(VISA_MASK_CLASS_IDS)]).save(root / mask)
            rows.append((category, "test", "anomaly", image.as_posix(), mask.as_posix()))
    (root / "LICENSE-DATASET").write_text("CC BY 4.0\n")
    split_csv = root / "split_csv" / "1cls.csv"
    split_csv.parent.mkdir(parents=True, exist_ok=True)
    with split_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("object", "split", "label", "image", "mask"))
        writer.writerows(rows[i] for i in rng.permutation(len(rows)))
    return root
