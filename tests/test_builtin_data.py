"""The built-in dataset: MVTec layout, exact masks, caching, determinism, options and errors."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from cvad.data import builtin, defects, synthetic
from cvad.data.base import DatasetError, ImageDataset
from cvad.data.builtin import (
    BUILTIN_CATEGORIES,
    DEFAULT_BUILTIN_CATEGORIES,
    STAMP_FILE,
    BuiltinDataset,
    BuiltinOptions,
    render_image,
)
from support import require

SMALL = dict(resolution=64, test_good_per_category=2)
TEXTURE_AND_OBJECT = ("brick", "capsule")  # one of each kind keeps the tests fast


def small_options(**changes) -> BuiltinOptions:
    fields = dict(SMALL, categories=TEXTURE_AND_OBJECT, train_per_category=3, test_defects_per_category=5)
    return BuiltinOptions(**(fields | changes))


def read_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> BuiltinDataset:
    return BuiltinDataset(small_options(), tmp_path_factory.mktemp("cache"))


def test_layout_is_exactly_mvtec(small_dataset: BuiltinDataset) -> None:
    root = small_dataset.root
    expected = {STAMP_FILE}
    options = small_dataset.options
    for category in TEXTURE_AND_OBJECT:
        expected |= {f"{category}/train/good/{i:03d}.png" for i in range(3)}
        expected |= {f"{category}/test/good/{i:03d}.png" for i in range(2)}
        for defect, count in options.defect_counts(category).items():
            expected |= {f"{category}/test/{defect}/{i:03d}.png" for i in range(count)}
            expected |= {f"{category}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(count)}
    assert set(file_hashes(root)) == expected
    assert options.defect_counts("brick") == {"scratch": 2, "crack": 1, "hole": 1, "stain": 1}
    assert options.defect_counts("capsule") == dict.fromkeys(BUILTIN_CATEGORIES["capsule"].defects, 1)
    for path in root.rglob("*.png"):
        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert im.mode == ("L" if path.name.endswith("_mask.png") else "RGB")


def test_splits_labels_and_masks(small_dataset: BuiltinDataset) -> None:
    assert small_dataset.categories() == list(TEXTURE_AND_OBJECT)
    for category in TEXTURE_AND_OBJECT:
        split = small_dataset.load(category)
        assert split.name == category and split.has_masks
        assert len(split.train) == 3 and all(s.label == 0 and s.mask is None for s in split.train)
        defective = [s for s in split.test if s.label == 1]
        assert len(defective) == 5 and len(split.test) == 7
        assert {s.defect for s in defective} == set(BUILTIN_CATEGORIES[category].defects)
        for sample in split.test:
            mask = ImageDataset([sample], 64)[0]["mask"]
            assert bool(mask.any()) == (sample.label == 1), sample.image
            if sample.mask is not None:
                assert set(np.unique(read_pixels(sample.mask))) == {0, 255}


def test_masks_are_exactly_the_changed_pixels(small_dataset: BuiltinDataset) -> None:
    """Re-render each defective image's clean picture: nothing outside its mask changed, most inside did."""
    for category in TEXTURE_AND_OBJECT:
        for sample in small_dataset.load(category).test:
            index = int(sample.image.stem)
            rendered = render_image(small_dataset.options, category, "test", sample.defect, index)
            written = read_pixels(sample.image)
            assert np.array_equal(written, rendered.image)
            changed = (written != rendered.clean).any(axis=2)
            if sample.label == 0:
                assert not changed.any() and not rendered.mask.any()
                continue
            mask = read_pixels(sample.mask) > 0
            assert np.array_equal(mask, rendered.mask)
            assert not (changed & ~mask).any(), f"{sample.image}: pixels outside the mask changed"
            assert changed[mask].mean() > 0.6, f"{sample.image}: most of the mask should differ from the clean image"


def test_apply_defect_leaves_outside_pixels_bit_identical() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((48, 48, 3), dtype=np.float32)
    alpha = synthetic.blob_alpha(rng, 48, np.array([24.0, 20.0], dtype=np.float32), 9.0)
    paint = defects.DefectPaint(np.zeros_like(image), alpha)
    result, mask = defects.apply_defect(image, paint, contrast=0.5)
    assert mask.sum() > 100
    assert np.array_equal(result[~mask], image[~mask])
    assert (np.abs(result - image).max(axis=2)[mask] > 0).all()
    # Faint fringe pixels of the alpha are dropped, not blended in outside the mask.
    assert ((alpha > 0) & ~mask).any()


@pytest.mark.parametrize("category", ["capsule", "hex_nut", "screw"])
def test_object_defects_stay_on_the_object_or_its_outline(category: str) -> None:
    """Surface defects and missing parts change object pixels only; extra parts grow out of the outline."""
    rng = np.random.default_rng(0)
    drawing = BUILTIN_CATEGORIES[category].draw(rng, 96)
    cover = drawing.scene.cover
    for draw in (defects.draw_scratch, defects.draw_crack, defects.draw_hole, defects.draw_stain):
        _, mask = defects.apply_defect(drawing.image, draw(rng, drawing.image, drawing.surface, 1.0), 1.0)
        assert mask.any() and (cover[mask] >= synthetic.MASK_THRESHOLD).all(), draw.__name__
    _, missing = defects.apply_defect(drawing.image, defects.draw_missing_part(rng, drawing.scene, 1.0), 1.0)
    assert missing.any() and (cover[missing] >= synthetic.MASK_THRESHOLD).all()
    _, extra = defects.apply_defect(drawing.image, defects.draw_extra_part(rng, drawing.scene, 1.0), 1.0)
    assert extra.any() and (cover[extra] <= 1 - synthetic.MASK_THRESHOLD).all()
    touching = extra & (np.roll(cover, 1, 0) + np.roll(cover, -1, 0) + np.roll(cover, 1, 1) + np.roll(cover, -1, 1) > 0)
    assert touching.any(), "an extra part must be attached to the object"


def test_defect_scale_and_contrast_change_the_defects() -> None:
    def mask_area_and_strength(**changes) -> tuple[float, float]:
        options = BuiltinOptions(**SMALL, categories=("grass",), **changes)
        areas, strengths = [], []
        for index in range(4):
            rendered = render_image(options, "grass", "test", "stain", index)
            diff = np.abs(rendered.image.astype(float) - rendered.clean).mean(axis=2)
            areas.append(rendered.mask.mean())
            strengths.append(diff[rendered.mask].mean())
        return float(np.mean(areas)), float(np.mean(strengths))

    small_area, _ = mask_area_and_strength(defect_scale=0.6)
    large_area, _ = mask_area_and_strength(defect_scale=1.5)
    assert large_area > 3 * small_area
    _, faint = mask_area_and_strength(defect_contrast=0.2)
    _, strong = mask_area_and_strength(defect_contrast=1.0)
    assert strong > 2.5 * faint


def test_unequal_train_sizes(tmp_path: Path) -> None:
    options = small_options(train_per_category={"capsule": 5, "brick": 2}, test_defects_per_category=1)
    dataset = BuiltinDataset(options, tmp_path)
    assert len(dataset.load("brick").train) == 2
    assert len(dataset.load("capsule").train) == 5


def test_same_options_give_identical_files_and_other_seeds_differ(tmp_path: Path) -> None:
    options = small_options(train_per_category=2, test_defects_per_category=4)
    first = BuiltinDataset(options, tmp_path / "a")
    second = BuiltinDataset(options, tmp_path / "b")
    assert first.root.name == second.root.name
    assert file_hashes(first.root) == file_hashes(second.root)
    reseeded = BuiltinDataset(options.model_copy(update={"seed": 1}), tmp_path / "a")
    assert reseeded.root != first.root
    for category in TEXTURE_AND_OBJECT:
        for relative in ("train/good/000.png", "test/good/001.png"):
            assert not np.array_equal(
                read_pixels(first.root / category / relative), read_pixels(reseeded.root / category / relative)
            )


def test_images_vary_within_a_category_and_differ_between_categories() -> None:
    options = BuiltinOptions(**SMALL, categories=DEFAULT_BUILTIN_CATEGORIES)
    firsts = []
    for category in options.categories:
        images = [render_image(options, category, "train", "good", i).image.astype(float) for i in range(3)]
        assert np.abs(images[0] - images[1]).mean() > 2, f"{category}: training images should differ in pose or crop"
        firsts.append(images[0].mean(axis=(0, 1)))
    colours = np.array(firsts)
    distances = np.abs(colours[:, None] - colours[None]).sum(axis=2)
    assert (distances + np.eye(len(colours)) * 1e9).min() > 10, "categories should differ in mean colour"


def test_cache_is_reused_and_progress_reported_once(tmp_path: Path) -> None:
    messages: list[str] = []
    options = small_options(train_per_category=1, test_defects_per_category=1)
    first = BuiltinDataset(options, tmp_path, progress=messages.append)
    assert len(messages) == 2 and "brick" in messages[0] and "capsule" in messages[1]
    stamp = json.loads((first.root / STAMP_FILE).read_text())
    assert stamp["options"] == options.model_dump(mode="json")
    before = {p: p.stat().st_mtime_ns for p in first.root.rglob("*.png")}
    again = BuiltinDataset(options, tmp_path, progress=messages.append)
    assert again.root == first.root and len(messages) == 2
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*.png")} == before
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name], "no temporary folder may remain"


def test_cache_dir_defaults_to_cvad_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVAD_CACHE", str(tmp_path))
    dataset = BuiltinDataset(small_options(categories=("capsule",), train_per_category=1, test_defects_per_category=1))
    assert dataset.root.parent == tmp_path / "builtin"


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path) -> None:
    def stop_at_second_category(message: str) -> None:
        if "capsule" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BuiltinDataset(small_options(), tmp_path, progress=stop_at_second_category)
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_stamp_is_refused(tmp_path: Path) -> None:
    options = small_options(categories=("brick",), train_per_category=1, test_defects_per_category=1)
    dataset = BuiltinDataset(options, tmp_path)
    stamp = dataset.root / STAMP_FILE
    stamp.write_text(stamp.read_text().replace('"seed": 0', '"seed": 5'))
    with pytest.raises(DatasetError, match="other options.*delete the folder"):
        BuiltinDataset(options, tmp_path)
    stamp.unlink()
    with pytest.raises(DatasetError, match="not a complete built-in dataset"):
        BuiltinDataset(options, tmp_path)


def test_loading_a_category_that_is_not_configured(small_dataset: BuiltinDataset) -> None:
    with pytest.raises(
        DatasetError, match="'grass' is not in this built-in dataset.*add it to dataset.builtin.categories"
    ):
        small_dataset.load("grass")
    with pytest.raises(DatasetError, match="built-in categories are: brick, capsule"):
        small_dataset.load("carpet")


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        (
            dict(categories=("brick", "carpet")),
            "categories",
            "unknown built-in categories ['carpet']; choose from: brick",
        ),
        (dict(categories=()), "categories", "no categories given"),
        (dict(categories=("brick", "brick")), "categories", "listed more than once: ['brick']"),
        (
            dict(train_per_category={"brick": 3}),
            "train_per_category",
            "missing ['capsule', 'grass', 'hex_nut', 'gravel']",
        ),
        (
            dict(categories=("brick",), train_per_category={"brick": 3, "grass": 1}),
            "train_per_category",
            "not in categories: ['grass']",
        ),
        (dict(train_per_category=0), "train_per_category", "at least 1"),
        (dict(resolution=16), "resolution", "greater than or equal to 32"),
        (dict(defect_contrast=1.5), "defect_contrast", "less than or equal to 1"),
        (dict(defect_scale=0), "defect_scale", "greater than 0"),
        (dict(seed=-1), "seed", "greater than or equal to 0"),
        (dict(colour="red"), "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_options_are_refused_with_the_field_and_reason(changes: dict, field: str, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        BuiltinOptions(**changes)
    (problem,) = error.value.errors()
    assert problem["loc"] == (field,)
    assert message in problem["msg"]


def test_options_are_frozen_and_hash_ignores_mapping_order() -> None:
    options = BuiltinOptions()
    with pytest.raises(ValidationError):
        options.seed = 3
    a = BuiltinOptions(categories=("brick", "grass"), train_per_category={"brick": 2, "grass": 3})
    b = BuiltinOptions(categories=("brick", "grass"), train_per_category={"grass": 3, "brick": 2})
    assert a.digest() == b.digest() != BuiltinOptions(categories=("brick", "grass"), train_per_category=2).digest()


def test_render_image_rejects_unknown_defects() -> None:
    with pytest.raises(ValueError, match="no defect 'missing_part'; its defects: scratch, crack, hole, stain"):
        render_image(BuiltinOptions(**SMALL), "brick", "test", "missing_part", 0)
    with pytest.raises(ValueError, match="training images are all 'good'"):
        render_image(BuiltinOptions(**SMALL), "brick", "train", "crack", 0)


def test_default_categories_need_no_system_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "GIMP_PATTERN_DIR", tmp_path / "no-gimp")
    assert len(DEFAULT_BUILTIN_CATEGORIES) >= 5
    kinds = {type(BUILTIN_CATEGORIES[c]) for c in DEFAULT_BUILTIN_CATEGORIES}
    assert kinds == {builtin.TextureCategory, builtin.ObjectCategory}
    for category in DEFAULT_BUILTIN_CATEGORIES:
        BUILTIN_CATEGORIES[category].check_available()


def test_a_missing_gimp_pattern_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "GIMP_PATTERN_DIR", tmp_path / "no-gimp")
    options = small_options(categories=("brick", "wood"), train_per_category=1, test_defects_per_category=1)
    with pytest.raises(DatasetError, match="install the Debian package 'gimp-data'.*need no system package: brick"):
        BuiltinDataset(options, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def write_gimp_pattern(path: Path, pixels: np.ndarray, name: bytes = b"Test pattern") -> None:
    height, width, depth = pixels.shape
    header = struct.pack(">5I4s", 24 + len(name) + 1, 1, width, height, depth, b"GPAT") + name + b"\0"
    path.write_bytes(header + pixels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_read_gimp_pattern_parses_every_pixel_depth(tmp_path: Path, depth: int) -> None:
    pixels = np.random.default_rng(depth).integers(0, 256, (5, 7, depth), dtype=np.uint8)
    path = tmp_path / "p.pat"
    write_gimp_pattern(path, pixels)
    parsed = synthetic.read_gimp_pattern(path)
    expected = pixels[..., 0] if depth <= 2 else pixels[..., :3]
    assert np.array_equal(parsed, expected)


def test_read_gimp_pattern_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "p.pat"
    write_gimp_pattern(path, np.zeros((4, 4, 3)))
    path.write_bytes(path.read_bytes().replace(b"GPAT", b"GIMP"))
    with pytest.raises(DatasetError, match="not a version-1 GIMP pattern"):
        synthetic.read_gimp_pattern(path)
    write_gimp_pattern(path, np.zeros((4, 4, 3)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        synthetic.read_gimp_pattern(path)


GIMP_CATEGORIES = [name for name, spec in BUILTIN_CATEGORIES.items() if spec.package == builtin.GIMP_PACKAGE]


def require_gimp_data() -> None:
    require(
        builtin.GIMP_PATTERN_DIR.is_dir(), f"Debian package gimp-data is not installed ({builtin.GIMP_PATTERN_DIR})"
    )


def test_enough_categories_for_a_fifteen_task_stream() -> None:
    assert len(BUILTIN_CATEGORIES) >= 15
    assert BuiltinOptions(categories=tuple(BUILTIN_CATEGORIES)).categories == tuple(BUILTIN_CATEGORIES)


@pytest.mark.parametrize("category", list(BUILTIN_CATEGORIES))
def test_every_category_renders_good_and_defective_images(category: str) -> None:
    """A textured good image with an empty mask, and every defect kind inside a non-empty mask."""
    if BUILTIN_CATEGORIES[category].package == builtin.GIMP_PACKAGE:
        require_gimp_data()
    options = BuiltinOptions(**SMALL, categories=(category,))
    good = render_image(options, category, "test", "good", 0)
    assert good.image.shape == (64, 64, 3) and not good.mask.any()
    assert good.image.astype(float).std() > 3, f"{category}: a good image should not be flat"
    for defect in BUILTIN_CATEGORIES[category].defects:
        rendered = render_image(options, category, "test", defect, 0)
        changed = (rendered.image != rendered.clean).any(axis=2)
        assert rendered.mask.sum() >= 4, (category, defect)
        assert not (changed & ~rendered.mask).any(), (category, defect)
        assert changed[rendered.mask].mean() > 0.5, (category, defect)


@pytest.mark.parametrize("category", GIMP_CATEGORIES)
def test_gimp_texture_categories_generate(tmp_path: Path, category: str) -> None:
    require_gimp_data()
    options = BuiltinOptions(**SMALL, categories=(category,), train_per_category=2, test_defects_per_category=4)
    split = BuiltinDataset(options, tmp_path).load(category)
    assert len(split.train) == 2 and sum(s.label for s in split.test) == 4
    first, second = (read_pixels(s.image).astype(float) for s in split.train)
    assert first.std() > 3 and np.abs(first - second).mean() > 2
