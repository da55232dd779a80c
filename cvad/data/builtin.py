"""The built-in dataset: generated from a seed, needs no download, written in the MVTec AD layout.

Texture categories are random crops of real texture photographs that ship with scikit-image
(and, optionally, GIMP's pattern files); object categories are drawn procedurally with varying
position and rotation. Defects (scratch, crack, hole, stain, missing or extra part) are painted
with exact pixel masks. A dataset is generated once per set of options into a cache folder
named by their hash and read back with the ordinary MVTec reader.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cvad import cache_root
from cvad.data import defects, synthetic
from cvad.data.base import CategorySplit, DatasetError
from cvad.data.mvtec import GOOD, MASK_SUFFIX, MVTecAD

GENERATOR_VERSION = 1
"""Part of every cache folder's hash: bump it whenever drawing code changes any pixel."""

GIMP_PATTERN_DIR = Path("/usr/share/gimp/2.0/patterns")
GIMP_PACKAGE = "gimp-data"
STAMP_FILE = "builtin_options.json"

TEXTURE_DEFECTS = ("scratch", "crack", "hole", "stain")


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class Drawing:
    """A clean image and where defects may be placed on it."""

    image: np.ndarray  # float [S, S, 3]
    surface: defects.Surface
    scene: synthetic.ObjectScene | None = None  # object categories only


@dataclass(frozen=True)
class TextureSource:
    pixels: np.ndarray  # uint8 [H, W] or [H, W, 3]
    crop_side: tuple[int, int]  # side of the square crop, in source pixels


@dataclass(frozen=True)
class TextureCategory:
    """Crops of one texture photograph, optionally tinted."""

    name: str
    source: str  # where the photograph comes from
    load: Callable[[], TextureSource]
    gain: tuple[float, float, float] | None = None  # per-channel tint for grey sources
    rotate90: bool = True  # False where the texture has a direction (brick courses, wood grain)
    defect_size: float = 1.0  # busy textures hide small defects: scale them up to stay learnable
    package: str | None = None  # system package that provides the photograph, if any
    defects: tuple[str, ...] = TEXTURE_DEFECTS

    def check_available(self) -> None:
        """Raise DatasetError, naming what to install, if the photograph is missing."""
        self.load()

    def draw(self, rng: np.random.Generator, size: int) -> Drawing:
        source = self.load()
        image = synthetic.texture_patch(rng, source.pixels, size, source.crop_side, self.rotate90)
        if self.gain is not None:
            image = synthetic.tint(image, self.gain)
        image = np.clip(image * rng.uniform(0.97, 1.03), 0.0, 1.0).astype(np.float32)  # lighting drift
        margin = max(int(0.1 * size), 1)
        centres = np.zeros((size, size), dtype=bool)
        centres[margin:-margin, margin:-margin] = True
        return Drawing(image, defects.Surface(centres))


@dataclass(frozen=True)
class ObjectCategory:
    """One procedurally drawn part, in a different pose in every image."""

    name: str
    draw_scene: Callable[[np.random.Generator, int], synthetic.ObjectScene]
    defects: tuple[str, ...]
    defect_size: float = 1.0  # plain scenes make any defect easy: scale them down to stay non-trivial
    package: None = None  # drawn from code: needs no files

    def check_available(self) -> None:
        """Objects are drawn from code and are always available."""

    def draw(self, rng: np.random.Generator, size: int) -> Drawing:
        scene = self.draw_scene(rng, size)
        surface = defects.Surface(centres=scene.cover >= 0.99, clip=scene.cover)
        return Drawing(scene.image(), surface, scene)


@cache
def _skimage_texture(name: str, crop_side: tuple[int, int]) -> TextureSource:
    from skimage import data

    pixels = getattr(data, name)()
    pixels.setflags(write=False)
    return TextureSource(pixels, crop_side)


@cache
def _gimp_texture(path: Path) -> TextureSource:
    if not path.is_file():
        self_contained = [name for name, spec in BUILTIN_CATEGORIES.items() if spec.package is None]
        raise DatasetError(
            f"the GIMP pattern {path} is missing; install the Debian package '{GIMP_PACKAGE}' "
            f"(apt-get install {GIMP_PACKAGE}) or choose built-in categories that need no system package: "
            f"{', '.join(self_contained)}"
        )
    tile = synthetic.read_gimp_pattern(path)
    # Patterns are small seamless tiles: tile them and crop about two tiles' width.
    side = min(tile.shape[:2])
    repeats = -(-512 // side)
    pixels = np.tile(tile, (repeats, repeats) + (1,) * (tile.ndim - 2))
    pixels.setflags(write=False)
    return TextureSource(pixels, (int(1.8 * side), int(2.2 * side)))


def _skimage(name: str, crop_side: tuple[int, int]) -> Callable[[], TextureSource]:
    """A 512 px photo from scikit-image; ``crop_side`` trades texture detail against how many
    texture elements a crop holds (random textures need many for stable statistics)."""
    return lambda: _skimage_texture(name, crop_side)


def _gimp(relative_path: str) -> Callable[[], TextureSource]:
    """A pattern of Debian's gimp-data, looked up under ``GIMP_PATTERN_DIR`` when needed."""
    return lambda: _gimp_texture(GIMP_PATTERN_DIR / relative_path)


def _gimp_category(name: str, relative_path: str, **options) -> TextureCategory:
    source = f"GIMP pattern {relative_path} (Debian package {GIMP_PACKAGE})"
    return TextureCategory(name, source, _gimp(relative_path), package=GIMP_PACKAGE, **options)


_OBJECT_DEFECTS = ("scratch", "stain", "missing_part", "extra_part")

BUILTIN_CATEGORIES: dict[str, TextureCategory | ObjectCategory] = {
    category.name: category
    for category in (
        TextureCategory(
            "brick", "scikit-image data.brick()", _skimage("brick", (230, 280)), (1.05, 0.70, 0.55), rotate90=False
        ),
        ObjectCategory(
            "capsule", synthetic.draw_capsule, ("crack", "hole", "stain", "missing_part", "extra_part"), defect_size=0.7
        ),
        TextureCategory(
            "grass", "scikit-image data.grass()", _skimage("grass", (380, 460)), (0.70, 0.95, 0.45), defect_size=1.6
        ),
        ObjectCategory("hex_nut", synthetic.draw_hex_nut, _OBJECT_DEFECTS, defect_size=0.8),
        TextureCategory(  # loose stones do not crack, and dark gaps between them would hide a crack
            "gravel",
            "scikit-image data.gravel()",
            _skimage("gravel", (380, 460)),
            (1.0, 0.93, 0.82),
            defect_size=1.6,
            defects=("scratch", "hole", "stain"),
        ),
        ObjectCategory("screw", synthetic.draw_screw, _OBJECT_DEFECTS),
        _gimp_category("wood", "Wood/wood1.pat", rotate90=False),
        _gimp_category("marble", "Stone/marble1.pat", gain=(1.0, 0.97, 0.92)),
        _gimp_category("leather", "Animal/leather.pat"),
        _gimp_category("burlap", "Fabric/burlap.pat"),
        _gimp_category("slate", "Stone/slate.pat", gain=(0.85, 0.92, 1.0)),
        _gimp_category("paper", "Paper/crinklepaper.pat"),
        _gimp_category("walnut", "Wood/walnut.pat", defect_size=1.6),
        _gimp_category("veneer", "Wood/wood5.pat", rotate90=False),
        _gimp_category("tile", "Stone/marble2.pat"),
        _gimp_category("paving", "Stone/terra.pat"),
    )
}
"""Every category the generator can draw, in its default task order."""

DEFAULT_BUILTIN_CATEGORIES: tuple[str, ...] = ("brick", "capsule", "grass", "hex_nut", "gravel")
"""Three photographed textures and two drawn objects; none needs a system package."""

DEFECT_SURFACE_DRAWERS = {
    "scratch": defects.draw_scratch,
    "crack": defects.draw_crack,
    "hole": defects.draw_hole,
    "stain": defects.draw_stain,
}
DEFECT_SHAPE_DRAWERS = {"missing_part": defects.draw_missing_part, "extra_part": defects.draw_extra_part}


# --------------------------------------------------------------------------- options


class BuiltinOptions(BaseModel):
    """What the built-in dataset contains; the same options always give the same files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="generator seed: every pixel follows from it")
    categories: tuple[str, ...] = Field(DEFAULT_BUILTIN_CATEGORIES, description="categories to generate, in task order")
    resolution: int = Field(256, ge=32, le=1024, description="generated image side in px (models resize later)")
    train_per_category: int | dict[str, int] = Field(
        30, description="defect-free training images per category; a mapping category -> count gives unequal sizes"
    )
    test_good_per_category: int = Field(10, ge=1, description="defect-free test images per category")
    test_defects_per_category: int = Field(
        15, ge=1, description="defective test images per category, spread evenly over its defect types"
    )
    defect_scale: float = Field(1.0, gt=0, le=3.0, description="multiplies every defect's size")
    # Defaults calibrated with PaDiM on MobileNetV2 at 224 px: image ROC-AUC about 0.8 to 0.96 per
    # category, some defect types near 0.7, none of the categories saturated.
    defect_contrast: float = Field(
        0.7, gt=0, le=1.0, description="how far defect pixels move towards the full defect appearance (0..1]"
    )

    @field_validator("categories")
    @classmethod
    def known_categories(cls, categories: tuple[str, ...]) -> tuple[str, ...]:
        if not categories:
            raise ValueError(f"no categories given; choose from: {', '.join(BUILTIN_CATEGORIES)}")
        unknown = [c for c in categories if c not in BUILTIN_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown built-in categories {unknown}; choose from: {', '.join(BUILTIN_CATEGORIES)}")
        repeated = sorted({c for c in categories if categories.count(c) > 1})
        if repeated:
            raise ValueError(f"categories listed more than once: {repeated}")
        return categories

    @field_validator("train_per_category")
    @classmethod
    def train_sizes_match_categories(cls, sizes: int | dict[str, int], info: ValidationInfo) -> int | dict[str, int]:
        if isinstance(sizes, int):
            if sizes < 1:
                raise ValueError(f"must be at least 1 (got {sizes})")
            return sizes
        small = {c: n for c, n in sizes.items() if n < 1}
        if small:
            raise ValueError(f"counts must be at least 1; got {small}")
        categories = info.data.get("categories")
        if categories is None:  # categories were invalid; that error is reported on its own
            return sizes
        missing = [c for c in categories if c not in sizes]
        extra = [c for c in sizes if c not in categories]
        if missing or extra:
            problems = ([f"missing {missing}"] if missing else []) + ([f"not in categories: {extra}"] if extra else [])
            raise ValueError(
                f"must give a count for exactly the configured categories {list(categories)}; {'; '.join(problems)}"
            )
        return sizes

    def train_count(self, category: str) -> int:
        sizes = self.train_per_category
        return sizes if isinstance(sizes, int) else sizes[category]

    def defect_counts(self, category: str) -> dict[str, int]:
        """Defective test images per defect type of ``category``: the total split as evenly as possible."""
        kinds = BUILTIN_CATEGORIES[category].defects
        total = self.test_defects_per_category
        return {kind: total // len(kinds) + (i < total % len(kinds)) for i, kind in enumerate(kinds)}

    def digest(self) -> str:
        """Short hash of these options and the generator version: the cache folder's name."""
        record = {"generator_version": GENERATOR_VERSION, "options": self.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedImage:
    """One generated image; for good images ``clean`` equals ``image`` and ``mask`` is empty."""

    image: np.ndarray  # uint8 [S, S, 3]
    clean: np.ndarray  # uint8 [S, S, 3], the same picture before the defect
    mask: np.ndarray  # bool [S, S]


def _image_rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Independent stream per file, so adding images or categories never changes the others."""
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(f"{split}/{defect}".encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def render_image(
    options: BuiltinOptions, category: str, split: Literal["train", "test"], defect: str, index: int
) -> RenderedImage:
    """The ``index``-th image of ``<category>/<split>/<defect>``, exactly as the generator writes it."""
    spec = BUILTIN_CATEGORIES[category]
    if split == "train" and defect != GOOD:
        raise ValueError(f"training images are all '{GOOD}', not {defect!r}")
    if defect != GOOD and defect not in spec.defects:
        raise ValueError(f"category {category!r} has no defect {defect!r}; its defects: {', '.join(spec.defects)}")
    rng = _image_rng(options.seed, category, split, defect, index)
    size = options.resolution
    drawing = spec.draw(rng, size)
    clean = synthetic.to_uint8(drawing.image)
    if defect == GOOD:
        return RenderedImage(clean, clean, np.zeros((size, size), dtype=bool))
    min_pixels = max(4, (size // 64) ** 2)
    scale = options.defect_scale * spec.defect_size
    for _ in range(20):  # a defect clipped to a thin object edge can vanish; draw it again
        if defect in DEFECT_SHAPE_DRAWERS:
            paint = DEFECT_SHAPE_DRAWERS[defect](rng, drawing.scene, scale)
        else:
            paint = DEFECT_SURFACE_DRAWERS[defect](rng, drawing.image, drawing.surface, scale)
        image, mask = defects.apply_defect(drawing.image, paint, options.defect_contrast)
        if mask.sum() >= min_pixels:
            return RenderedImage(synthetic.to_uint8(image), clean, mask)
    raise RuntimeError(f"could not place a visible {defect} on {category} image {index}: this is a generator bug")


def _save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def write_category(options: BuiltinOptions, category: str, folder: Path) -> None:
    """Write one category in the MVTec AD layout under ``folder``."""
    plan = [("train", GOOD, options.train_count(category)), ("test", GOOD, options.test_good_per_category)]
    plan += [("test", kind, n) for kind, n in options.defect_counts(category).items() if n > 0]
    for split, defect, count in plan:
        image_dir = folder / split / defect
        image_dir.mkdir(parents=True)
        mask_dir = folder / "ground_truth" / defect
        if defect != GOOD:
            mask_dir.mkdir(parents=True)
        for index in range(count):
            rendered = render_image(options, category, split, defect, index)
            stem = f"{index:03d}"
            _save_png(rendered.image, image_dir / f"{stem}.png")
            if defect != GOOD:
                _save_png(rendered.mask.astype(np.uint8) * 255, mask_dir / f"{stem}{MASK_SUFFIX}")


def generate(options: BuiltinOptions, root: Path, progress: Callable[[str], None] | None = None) -> None:
    """Generate the whole dataset into ``root`` atomically: all of it appears, or none of it.

    Files go to a hidden temporary sibling that is renamed to ``root`` once complete; if another
    process finished the same dataset first, its copy is kept and ours discarded.
    """
    for category in options.categories:
        BUILTIN_CATEGORIES[category].check_available()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for number, category in enumerate(options.categories, 1):
            if progress is not None:
                progress(f"generating built-in category {category} ({number}/{len(options.categories)})")
            write_category(options, category, staging / category)
        stamp = {"generator_version": GENERATOR_VERSION, "options": options.model_dump(mode="json")}
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable
        try:
            staging.rename(root)
        except OSError:
            if not (root / STAMP_FILE).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def default_cache_dir() -> Path:
    """``$CVAD_CACHE/builtin``, else ``~/.cache/cvad/builtin``."""
    return cache_root() / "builtin"


class BuiltinDataset:
    """The generated dataset for ``options``, created under ``cache_dir`` on first use and reused after."""

    def __init__(
        self,
        options: BuiltinOptions | None = None,
        cache_dir: str | Path | None = None,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options if options is not None else BuiltinOptions()
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.root: Path = cache / self.options.digest()
        if not self.root.is_dir():
            generate(self.options, self.root, progress)
        self._check_stamp()
        self._reader = MVTecAD(self.root, require_masks=True)

    def _check_stamp(self) -> None:
        stamp_path = self.root / STAMP_FILE
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"{stamp_path} is missing or unreadable ({error}); the folder {self.root} is not a complete "
                "built-in dataset: delete it and it will be generated again"
            ) from None
        expected = {"generator_version": GENERATOR_VERSION, "options": self.options.model_dump(mode="json")}
        if stamp != json.loads(json.dumps(expected)):
            raise DatasetError(
                f"{self.root} was generated for other options than requested ({stamp_path} differs); "
                "delete the folder and it will be generated again"
            )

    def categories(self) -> list[str]:
        """The configured categories, in task order."""
        return list(self.options.categories)

    def load(self, category: str) -> CategorySplit:
        if category not in self.options.categories:
            hint = (
                "add it to dataset.builtin.categories"
                if category in BUILTIN_CATEGORIES
                else f"built-in categories are: {', '.join(BUILTIN_CATEGORIES)}"
            )
            raise DatasetError(
                f"category {category!r} is not in this built-in dataset (configured: "
                f"{', '.join(self.options.categories)}); {hint}"
            )
        return self._reader.load(category)
