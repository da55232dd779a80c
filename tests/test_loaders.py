"""The MVTec-layout and VisA readers on tiny trees in the real layouts, and their errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvad.data.base import DatasetError, ImageDataset
from cvad.data.mvtec import FolderDataset, MVTecAD
from cvad.data.presets import MVTEC_AD_CATEGORIES, VISA_CATEGORIES
from cvad.data.visa import VisA
from layouts import VISA_MASK_CLASS_IDS, defect_box, make_mvtec_tree, make_visa_tree


def rewrite_split_csv(root: Path, edit) -> Path:
    """Apply ``edit`` to the list of lines of VisA's split file; returns the file's path."""
    split_csv = root / "split_csv" / "1cls.csv"
    lines = split_csv.read_text().splitlines()
    split_csv.write_text("\n".join(edit(lines)) + "\n")
    return split_csv


def with_field(line: str, column: str, value: str) -> str:
    """A split-file line with one column replaced (no quoting needed for VisA's plain values)."""
    fields = line.split(",")
    fields[("object", "split", "label", "image", "mask").index(column)] = value
    return ",".join(fields)


def line_of(split_csv: Path, fragment: str) -> int:
    """1-based line number of the first line of ``split_csv`` containing ``fragment``."""
    return next(n for n, line in enumerate(split_csv.read_text().splitlines(), 1) if fragment in line)


# --- presets -----------------------------------------------------------------------------


def test_presets_list_the_published_categories() -> None:
    assert len(MVTEC_AD_CATEGORIES) == 15 and list(MVTEC_AD_CATEGORIES) == sorted(MVTEC_AD_CATEGORIES)
    assert len(VISA_CATEGORIES) == 12 and list(VISA_CATEGORIES) == sorted(VISA_CATEGORIES)
    assert {"metal_nut", "toothbrush", "zipper"} <= set(MVTEC_AD_CATEGORIES)
    assert {"macaroni1", "macaroni2", "pipe_fryum"} <= set(VISA_CATEGORIES)
    assert "macaroni3" not in VISA_CATEGORIES


# --- MVTec layout ------------------------------------------------------------------------


def test_mvtec_reads_counts_labels_and_pairs_masks(tmp_path: Path) -> None:
    root = make_mvtec_tree(
        tmp_path, ("bottle", "wood"), n_train=3, n_test_good=2, defects=("crack", "hole"), n_defect=2
    )
    reader = MVTecAD(root)
    assert reader.categories() == ["bottle", "wood"]  # license.txt at the root is not a category
    split = reader.load("wood")
    assert split.name == "wood" and split.has_masks
    assert len(split.train) == 3 and all(s.label == 0 and s.defect == "good" and s.mask is None for s in split.train)
    assert [s.image.name for s in split.train] == ["000.png", "001.png", "002.png"]
    assert [(s.defect, s.label) for s in split.test] == [("good", 0)] * 2 + [("crack", 1)] * 2 + [("hole", 1)] * 2
    for sample in split.test:
        if sample.label:
            assert sample.mask == root / "wood" / "ground_truth" / sample.defect / f"{sample.image.stem}_mask.png"
        else:
            assert sample.mask is None
    assert split == MVTecAD(root).load("wood")  # deterministic


def test_mvtec_image_dataset_yields_aligned_images_and_masks(tmp_path: Path) -> None:
    size = 32
    root = make_mvtec_tree(tmp_path, ("grid",), n_train=1, n_test_good=1, n_defect=1, size=size)
    split = MVTecAD(root).load("grid")  # grayscale PNGs, as the real grid category
    good, defective = split.test
    rows, cols = defect_box(size, size)
    item = ImageDataset(split.test, image_size=size)[1]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.bool
    assert item["label"] == 1 and defective.label == 1
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[rows, cols] = True
    assert torch.equal(item["mask"], expected)
    assert item["image"][:, rows, cols].float().mean() < item["image"][:, 2 * size // 3 :, :].float().mean() / 3
    resized = ImageDataset(split.test, image_size=16)
    assert resized[1]["mask"][6, 6] and not resized[1]["mask"][14, 14]
    assert resized[0]["label"] == 0 and not resized[0]["mask"].any() and good.mask is None


def test_mvtec_accepts_extensions_case_insensitively_and_skips_other_files(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, ("bottle",), n_train=3)
    train = root / "bottle" / "train" / "good"
    (train / "001.png").rename(train / "001.PNG")
    (train / "Thumbs.db").write_bytes(b"\0")
    (train / ".DS_Store").write_bytes(b"\0")
    assert [s.image.name for s in MVTecAD(root).load("bottle").train] == ["000.png", "001.PNG", "002.png"]


def test_folder_dataset_without_ground_truth_has_no_masks(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, ("bottle", "wood"), defects=("scratch",), n_defect=2)
    shutil.rmtree(root / "wood" / "ground_truth")
    reader = FolderDataset(root)
    wood, bottle = reader.load("wood"), reader.load("bottle")
    assert not wood.has_masks and all(s.mask is None for s in wood.test)
    assert sum(s.label for s in wood.test) == 2 and {s.defect for s in wood.test} == {"good", "scratch"}
    assert bottle.has_masks and all((s.mask is not None) == bool(s.label) for s in bottle.test)
    assert not ImageDataset(wood.test, image_size=8)[-1]["mask"].any()


def _mvtec_case(tmp_path: Path, case: str) -> tuple[object, Path]:
    """Build a broken MVTec tree; returns (what raises, path the message must name)."""
    root = make_mvtec_tree(tmp_path / "mvtec", ("bottle",), n_defect=2)
    bottle = root / "bottle"
    if case == "root missing":
        missing = tmp_path / "nowhere"
        return lambda: MVTecAD(missing), missing
    if case == "unknown category":
        return lambda: MVTecAD(root).load("bottel"), root / "bottel"
    if case == "no train/good":
        shutil.rmtree(bottle / "train" / "good")
        return lambda: MVTecAD(root).load("bottle"), bottle / "train" / "good"
    if case == "empty train/good":
        for image in (bottle / "train" / "good").iterdir():
            image.unlink()
        return lambda: MVTecAD(root).load("bottle"), bottle / "train" / "good"
    if case == "no test":
        shutil.rmtree(bottle / "test")
        return lambda: MVTecAD(root).load("bottle"), bottle / "test"
    if case == "orphan mask":
        (bottle / "test" / "crack" / "001.png").unlink()
        return lambda: MVTecAD(root).load("bottle"), bottle / "ground_truth" / "crack" / "001_mask.png"
    if case == "mask missing (MVTecAD, no ground_truth)":
        shutil.rmtree(bottle / "ground_truth")
        return lambda: MVTecAD(root).load("bottle"), bottle / "test" / "crack" / "000.png"
    if case == "mask missing (FolderDataset, partial ground_truth)":
        (bottle / "ground_truth" / "crack" / "001_mask.png").unlink()
        return lambda: FolderDataset(root).load("bottle"), bottle / "test" / "crack" / "001.png"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "root missing",
        "unknown category",
        "no train/good",
        "empty train/good",
        "no test",
        "orphan mask",
        "mask missing (MVTecAD, no ground_truth)",
        "mask missing (FolderDataset, partial ground_truth)",
    ],
)
def test_mvtec_errors_name_the_offending_path(tmp_path: Path, case: str) -> None:
    action, path = _mvtec_case(tmp_path, case)
    with pytest.raises(DatasetError) as error:
        action()
    assert str(path) in str(error.value)


def test_mvtec_unknown_category_lists_available_ones(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, ("bottle", "wood"), n_train=1, n_test_good=1, n_defect=1)
    with pytest.raises(DatasetError, match="available under .*: bottle, wood"):
        MVTecAD(root).load("cable")


def test_mvtec_missing_mask_points_to_folder_dataset(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, ("bottle",), masks=False, n_train=1, n_test_good=1, n_defect=1)
    with pytest.raises(DatasetError, match="FolderDataset"):
        MVTecAD(root).load("bottle")


# --- VisA --------------------------------------------------------------------------------


def test_visa_reads_split_file_sorted_with_masks(tmp_path: Path) -> None:
    root = make_visa_tree(tmp_path, ("candle", "pcb1"), n_train=3, n_test_normal=2, n_anomaly=2)
    reader = VisA(root)
    assert reader.categories() == ["candle", "pcb1"]
    split = reader.load("pcb1")
    assert split.name == "pcb1" and split.has_masks
    normal = root / "pcb1" / "Data" / "Images" / "Normal"
    assert [s.image for s in split.train] == [normal / f"{i:04d}.JPG" for i in range(3)]
    assert all(s.label == 0 and s.defect == "good" and s.mask is None for s in split.train)
    assert [s.image.name for s in split.test] == ["000.JPG", "001.JPG", "0003.JPG", "0004.JPG"]
    assert [(s.label, s.defect) for s in split.test] == [(1, "anomaly")] * 2 + [(0, "good")] * 2
    assert [s.mask for s in split.test[:2]] == [
        root / "pcb1" / "Data" / "Masks" / "Anomaly" / f"00{i}.png" for i in range(2)
    ]
    assert split == VisA(root).load("pcb1")


def test_visa_class_id_masks_read_as_defect_pixels(tmp_path: Path) -> None:
    size = 32
    root = make_visa_tree(tmp_path, ("candle",), n_train=1, n_test_normal=1, n_anomaly=2, size=size)
    split = VisA(root).load("candle")
    with Image.open(split.test[1].mask) as mask_file:  # the second anomaly's mask uses class id 2
        assert set(np.unique(np.asarray(mask_file)).tolist()) == {0, VISA_MASK_CLASS_IDS[1]}
    with Image.open(split.test[0].image) as image_file:
        assert image_file.size == (size + size // 2, size)  # landscape, as VisA images
    dataset = ImageDataset(split.test, image_size=16)
    for index in (0, 1):
        item = dataset[index]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
        assert item["mask"].dtype == torch.bool and item["label"] == 1
        # the defect box covers rows 4..7 and columns 4..7 after resizing to 16x16
        assert item["mask"][4:8, 4:8].all() and item["mask"].sum() == 16
    assert not dataset[2]["mask"].any() and dataset[2]["label"] == 0


def test_visa_accepts_other_split_file(tmp_path: Path) -> None:
    root = make_visa_tree(tmp_path, ("candle", "pcb1"), n_train=1, n_test_normal=1, n_anomaly=1)
    lines = (root / "split_csv" / "1cls.csv").read_text().splitlines()
    only_candle = tmp_path / "candle_only.csv"
    only_candle.write_text("\n".join([lines[0]] + [line for line in lines[1:] if line.startswith("candle,")]) + "\n")
    assert VisA(root, split_csv=only_candle).categories() == ["candle"]


def _visa_case(tmp_path: Path, case: str) -> tuple[object, list[str]]:
    """Build a broken VisA tree; returns (what raises, fragments the message must contain)."""
    root = make_visa_tree(tmp_path / "visa", ("candle", "pcb1"), n_train=2, n_test_normal=1, n_anomaly=2)
    split_csv = root / "split_csv" / "1cls.csv"
    candle = root / "candle" / "Data"
    if case == "root missing":
        return lambda: VisA(tmp_path / "nowhere"), [str(tmp_path / "nowhere")]
    if case == "split csv missing":
        split_csv.unlink()
        return lambda: VisA(root), [str(split_csv)]
    if case == "bad header":
        rewrite_split_csv(root, lambda lines: ["object,split,label,image,mask_path"] + lines[1:])
        return lambda: VisA(root), [str(split_csv), "object,split,label,image,mask"]
    if case == "empty split csv":
        split_csv.write_text("")
        return lambda: VisA(root), [str(split_csv), "object,split,label,image,mask"]
    if case == "image file missing":
        image = candle / "Images" / "Anomaly" / "001.JPG"
        image.unlink()
        return lambda: VisA(root).load("candle"), [
            str(split_csv),
            f"line {line_of(split_csv, 'candle/Data/Images/Anomaly/001.JPG')}",
            str(image),
        ]
    if case == "mask file missing":
        mask = candle / "Masks" / "Anomaly" / "000.png"
        mask.unlink()
        return lambda: VisA(root).load("candle"), [
            str(split_csv),
            f"line {line_of(split_csv, 'candle/Data/Masks/Anomaly/000.png')}",
            str(mask),
        ]
    if case == "anomaly without mask":
        rewrite_split_csv(
            root, lambda lines: [line.replace(",candle/Data/Masks/Anomaly/000.png", ",") for line in lines]
        )
        return lambda: VisA(root).load("candle"), [
            str(split_csv),
            f"line {line_of(split_csv, 'candle/Data/Images/Anomaly/000.JPG')}",
        ]
    if case == "no train rows":
        rewrite_split_csv(root, lambda lines: [line.replace("pcb1,train,", "pcb1,test,") for line in lines])
        return lambda: VisA(root).load("pcb1"), [str(split_csv), "'pcb1'", "no train rows"]
    if case == "anomaly in train":
        rewrite_split_csv(
            root,
            lambda lines: [line.replace("candle,test,anomaly", "candle,train,anomaly") for line in lines],
        )
        return lambda: VisA(root).load("candle"), [
            str(split_csv),
            str(candle / "Images" / "Anomaly" / "000.JPG"),
        ]
    if case == "unknown label":
        rewrite_split_csv(root, lambda lines: lines[:1] + [with_field(lines[1], "label", "good")] + lines[2:])
        return lambda: VisA(root), [str(split_csv), "line 2", "'good'", "normal, anomaly"]
    if case == "unknown split":
        rewrite_split_csv(root, lambda lines: lines[:1] + [with_field(lines[1], "split", "val")] + lines[2:])
        return lambda: VisA(root), [str(split_csv), "line 2", "'val'", "train, test"]
    if case == "unknown category":
        return lambda: VisA(root).load("macaroni3"), [str(split_csv), "macaroni3", "candle, pcb1"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "root missing",
        "split csv missing",
        "bad header",
        "empty split csv",
        "image file missing",
        "mask file missing",
        "anomaly without mask",
        "no train rows",
        "anomaly in train",
        "unknown label",
        "unknown split",
        "unknown category",
    ],
)
def test_visa_errors_name_the_offending_path(tmp_path: Path, case: str) -> None:
    action, fragments = _visa_case(tmp_path, case)
    with pytest.raises(DatasetError) as error:
        action()
    for fragment in fragments:
        assert fragment in str(error.value)


def test_task_stream_from_config_uses_presets_and_names_missing_categories(tmp_path):
    from cvad.config import validate_config
    from cvad.data import load_task_stream

    root = make_mvtec_tree(tmp_path / "mvtec", categories=("wood", "bottle"))
    config = validate_config({"dataset": {"name": "mvtec", "root": str(root), "tasks": ["wood", "bottle"]}})
    assert [s.name for s in load_task_stream(config.dataset).splits] == ["wood", "bottle"]
    preset = validate_config({"dataset": {"name": "mvtec", "root": str(root), "tasks": "mvtec-ad"}})
    with pytest.raises(DatasetError) as info:
        load_task_stream(preset.dataset)
    assert "'cable'" in str(info.value) and str(root) in str(info.value)


# --- files that are not what they seem -----------------------------------------------------


def mvtec_category(tmp_path: Path) -> Path:
    return make_mvtec_tree(tmp_path, ("bottle",), n_train=2, n_test_good=1, defects=("crack",), n_defect=1) / "bottle"


@pytest.mark.parametrize("where", ["train/good", "test/crack"])
def test_a_corrupt_image_is_named_when_the_stream_is_listed(tmp_path: Path, where: str) -> None:
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream

    category = mvtec_category(tmp_path)
    broken = sorted((category / where).iterdir())[0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(DatasetError, match=f"{broken}.*cannot be read as an image"):
        load_task_stream(DatasetConfig(name="mvtec", root=tmp_path, tasks=["bottle"]))


def cut_short(path: Path) -> None:
    """Keep the header and half the data: the file opens and says its size, but its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def as_jpeg_cut_short(path: Path) -> None:
    with Image.open(path) as im:
        im.convert("RGB").save(path, format="JPEG")  # a JPEG under a .png name: Pillow reads by content
    cut_short(path)


def dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "gone.png")


def folder_named_like_an_image(path: Path) -> None:
    path.unlink()
    path.mkdir()


BROKEN = {
    "truncated PNG": cut_short,
    "truncated JPEG": as_jpeg_cut_short,
    "empty file": lambda path: path.write_bytes(b""),
    "text file": lambda path: path.write_text("not an image\n"),
    "dangling symlink": dangling_link,
    "folder": folder_named_like_an_image,
}


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.parametrize("where", ["train/good", "test/crack", "ground_truth/crack"])
def test_every_kind_of_broken_file_is_named_at_listing_even_when_its_header_reads(tmp_path, kind, where) -> None:
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream

    category = mvtec_category(tmp_path)
    broken = sorted((category / where).iterdir())[0]
    BROKEN[kind](broken)
    with pytest.raises(DatasetError, match=f"{broken} cannot be read as an image .*; replace the file or remove it"):
        load_task_stream(DatasetConfig(name="mvtec", root=tmp_path, tasks=["bottle"]))


def test_a_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream

    category = mvtec_category(tmp_path)
    mask = next((category / "ground_truth" / "crack").iterdir())
    with Image.open(mask) as im:
        im.resize((im.width // 2, im.height // 2)).save(mask)
    with pytest.raises(DatasetError, match=f"mask {mask} is .* but its image .* must match its image"):
        load_task_stream(DatasetConfig(name="mvtec", root=tmp_path, tasks=["bottle"]))


def test_a_test_set_of_good_images_only_is_explained(tmp_path: Path) -> None:
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream

    category = mvtec_category(tmp_path)
    shutil.rmtree(category / "test" / "crack")
    shutil.rmtree(category / "ground_truth")
    with pytest.raises(DatasetError, match="test set of bottle holds only good images .* add defective test images"):
        load_task_stream(DatasetConfig(name="folder", root=tmp_path, tasks=["bottle"]))


def test_names_with_spaces_and_non_ascii_and_symlinked_folders_list_and_read(tmp_path: Path) -> None:
    """What a camera or a pipeline writes: 'Kratzer ä 01.png', Japanese names, a category folder that is a link."""
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream
    from cvad.data.base import read_mask, read_rgb

    real = make_mvtec_tree(tmp_path / "real", ("bottle",), n_train=2, n_test_good=1, defects=("crack",), n_defect=1)
    crack = real / "bottle" / "test" / "crack" / "000.png"
    crack.rename(crack.with_name("Kratzer ä 01.png"))
    mask = real / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.rename(mask.with_name("Kratzer ä 01_mask.png"))
    good = real / "bottle" / "train" / "good" / "000.png"
    good.rename(good.with_name("良品 画像.png"))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "my bottle").symlink_to(real / "bottle", target_is_directory=True)
    stream = load_task_stream(DatasetConfig(name="mvtec", root=linked, tasks=["my bottle"], image_size=32))
    (split,) = stream.splits
    listed = {sample.image.name for sample in (*split.train, *split.test)}
    assert {"良品 画像.png", "Kratzer ä 01.png"} <= listed
    image = read_rgb(linked / "my bottle" / "test" / "crack" / "Kratzer ä 01.png", 32)
    assert image.shape == (3, 32, 32)
    assert read_mask(linked / "my bottle" / "ground_truth" / "crack" / "Kratzer ä 01_mask.png", 32).any()
    assert list(stream.tasks) == ["my bottle"]


# --- every image mode and bit depth a camera or a pipeline writes ----------------------------

BANDS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (240, 240, 240))  # four 8-px vertical bands
GRAYS = (0, 85, 170, 255)


def banded(values: tuple, dtype=np.uint8, scale: float = 1.0) -> np.ndarray:
    """32x32 pixels of four vertical bands; each band's value times ``scale``."""
    row = np.repeat(np.asarray(values, dtype=np.float64) * scale, 8, axis=0)
    pixels = np.broadcast_to(row, (32, *row.shape))
    return (pixels if np.issubdtype(dtype, np.floating) else np.rint(pixels)).astype(dtype)


def png_16_bit(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel PNG (gray, gray+alpha, RGB or RGBA by channel count), which Pillow cannot write."""
    import struct
    import zlib

    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.reshape(32, 32 * channels).astype(">u2")
    data = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 32, 32, 16, colour_type, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def with_alpha(pixels: np.ndarray, opaque: int) -> np.ndarray:
    alpha = np.full((*pixels.shape[:2], 1), opaque, pixels.dtype)
    return np.concatenate([pixels if pixels.ndim == 3 else pixels[..., None], alpha], axis=2)


def pillow(mode: str, values: tuple, fmt: str = "PNG", **save):
    def write(path: Path) -> None:
        image = Image.fromarray(banded(values))
        palette = {"palette": Image.Palette.ADAPTIVE, "colors": 4} if mode == "P" else {}  # exact: four colours
        image.convert(mode, **palette).save(path, format=fmt, **save)

    return write


def from_array(pixels: np.ndarray, fmt: str):
    def write(path: Path) -> None:
        Image.fromarray(pixels).save(path, format=fmt)

    return write


def palette_with_transparency(path: Path) -> None:
    image = Image.fromarray(banded(BANDS)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    image.save(path, format="PNG", transparency=0)


def big_endian_tiff(path: Path) -> None:
    import tifffile  # Pillow's own conversion to I;16B clips to 255

    tifffile.imwrite(path, banded(GRAYS, np.uint16, 257).astype(">u2"), byteorder=">")


def lab_tiff(path: Path) -> None:
    from PIL import ImageCms

    srgb_to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    ImageCms.applyTransform(Image.fromarray(banded(BANDS)), srgb_to_lab).save(path, format="TIFF")


# name -> (writer, expected RGB of each band, tolerance in 8-bit levels)
IMAGE_FILES = {
    "RGB PNG": (pillow("RGB", BANDS), BANDS, 0),
    "RGBA PNG": (pillow("RGBA", BANDS), BANDS, 0),
    "8-bit gray PNG (L)": (pillow("L", GRAYS), GRAYS, 0),
    "gray + alpha PNG (LA)": (pillow("LA", GRAYS), GRAYS, 0),
    "palette PNG (P)": (pillow("P", BANDS), BANDS, 0),
    "palette PNG with transparency": (palette_with_transparency, BANDS, 0),
    "1-bit PNG": (pillow("1", (0, 255, 0, 255)), (0, 255, 0, 255), 0),
    "16-bit gray PNG (I;16)": (from_array(banded(GRAYS, np.uint16, 257), "PNG"), GRAYS, 1),
    "48-bit RGB PNG": (lambda p: png_16_bit(p, banded(BANDS, np.uint16, 257)), BANDS, 1),
    "64-bit RGBA PNG": (lambda p: png_16_bit(p, with_alpha(banded(BANDS, np.uint16, 257), 65535)), BANDS, 1),
    "32-bit gray+alpha PNG": (lambda p: png_16_bit(p, with_alpha(banded(GRAYS, np.uint16, 257), 65535)), GRAYS, 1),
    "RGB JPEG": (pillow("RGB", BANDS, "JPEG", quality=95), BANDS, 12),
    "gray JPEG": (pillow("L", GRAYS, "JPEG", quality=95), GRAYS, 6),
    "CMYK JPEG": (pillow("CMYK", BANDS, "JPEG", quality=95), BANDS, 12),
    "32-bit integer TIFF (I)": (from_array(banded(GRAYS, np.int32, 257), "TIFF"), GRAYS, 1),
    "float TIFF in [0, 1] (F)": (from_array(banded(GRAYS, np.float32, 1 / 255), "TIFF"), GRAYS, 1),
    "16-bit big-endian TIFF (I;16B)": (big_endian_tiff, GRAYS, 1),
    "CIE L*a*b* TIFF": (lab_tiff, BANDS, 16),  # 8-bit L*a*b* holds saturated sRGB to about 13 levels
    "BMP": (pillow("RGB", BANDS, "BMP"), BANDS, 0),
    "GIF": (pillow("P", BANDS, "GIF"), BANDS, 0),
    "WebP, lossless": (pillow("RGB", BANDS, "WEBP", lossless=True), BANDS, 0),
}


@pytest.mark.parametrize("kind", list(IMAGE_FILES))
def test_every_image_mode_and_bit_depth_lists_and_reads_as_the_picture_it_holds(tmp_path: Path, kind: str) -> None:
    """Pillow opens each file in its own mode; cvad reads each as the 8-bit RGB picture it depicts."""
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream
    from cvad.data.base import read_rgb

    write, expected, tolerance = IMAGE_FILES[kind]
    category = mvtec_category(tmp_path)
    image = category / "train" / "good" / "000.png"  # Pillow reads by content, whatever the suffix
    write(image)
    (split,) = load_task_stream(DatasetConfig(name="mvtec", root=tmp_path, tasks=["bottle"], image_size=32)).splits
    assert image in {sample.image for sample in split.train}
    pixels = read_rgb(image, 32).to(torch.int32)
    for band, value in enumerate(expected):
        want = torch.tensor(value if isinstance(value, tuple) else (value,) * 3, dtype=torch.int32)
        got = pixels[:, 16, band * 8 + 4]
        assert (got - want).abs().max() <= tolerance, f"{kind}: band {band} reads {got.tolist()}, not {want.tolist()}"


def left_half(value, dtype=np.uint8) -> np.ndarray:
    """A 32x32 mask: the left half ``value`` (the defect), the right half 0."""
    mask = np.zeros((32, 32), dtype)
    mask[:, :16] = value
    return mask


def palette_mask(path: Path) -> None:
    """VisA-style: palette indices as class ids, index 0 black background."""
    mask = Image.fromarray(left_half(1)).convert("P")
    mask.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    mask.save(path, format="PNG")


MASK_FILES = {
    "8-bit gray (L) 0/255": from_array(left_half(255), "PNG"),
    "class ids 0/1 in 8 bits": from_array(left_half(1), "PNG"),
    "1-bit": lambda p: Image.fromarray(left_half(255)).convert("1").save(p, format="PNG"),
    "palette (P)": palette_mask,
    "RGB white on black": lambda p: Image.fromarray(left_half(255)).convert("RGB").save(p, format="PNG"),
    "RGBA, opaque": lambda p: Image.fromarray(left_half(255)).convert("RGBA").save(p, format="PNG"),
    "gray + alpha (LA)": lambda p: Image.fromarray(left_half(255)).convert("LA").save(p, format="PNG"),
    "16-bit class ids (I;16)": from_array(left_half(1, np.uint16), "PNG"),
    "16-bit 0/65535": lambda p: png_16_bit(p, left_half(65535, np.uint16)),
    "32-bit integer TIFF (I)": from_array(left_half(1, np.int32), "TIFF"),
    "float TIFF (F)": from_array(left_half(1.0, np.float32), "TIFF"),
}


@pytest.mark.parametrize("kind", list(MASK_FILES))
def test_every_mask_mode_and_bit_depth_reads_its_defect_pixels(tmp_path: Path, kind: str) -> None:
    from cvad.config import DatasetConfig
    from cvad.data import load_task_stream
    from cvad.data.base import read_mask

    category = mvtec_category(tmp_path)
    mask = category / "ground_truth" / "crack" / "000_mask.png"
    MASK_FILES[kind](mask)
    (split,) = load_task_stream(DatasetConfig(name="mvtec", root=tmp_path, tasks=["bottle"], image_size=32)).splits
    assert mask in {sample.mask for sample in split.test}
    defect = read_mask(mask, 32)
    assert defect[:, :16].all() and not defect[:, 16:].any(), f"{kind}: the defect is not the left half"
