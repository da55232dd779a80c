"""Category lists of the public benchmarks, in the order papers report them."""

from __future__ import annotations

MVTEC_AD_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

TASK_PRESETS: dict[str, tuple[str, ...]] = {"mvtec-ad": MVTEC_AD_CATEGORIES, "visa": VISA_CATEGORIES}
"""Named task orders for ``dataset.tasks``: the full benchmark streams."""
