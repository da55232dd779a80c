"""The paper's published results, cell by cell, with the cvad configuration each one describes.

Published numbers, never measured here: the dashboard draws them as a labelled reference and
``bench/paper_efficiency.py`` prices every configuration with ``cvad cost`` to set cvad's
figures beside them. Cells are copied from the paper's result tables as printed
(``image F1 / pixel F1 / GFLOPs / MB``); the paper's VisA efficiency columns repeat its MVTec AD
ones figure for figure.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKBONE_COLUMNS = {
    "MCUNet": "mcunet_in3",
    "MobileNet": "mobilenetv2_100",
    "PhiNet": "phinet_1.2_0.5_6_downsampling",
    "DeiT Tiny": "deit_tiny_patch16_224",
    "ViT Base": "vit_base_patch14_dinov2",
}
TASKS = {"mvtec": 15, "visa": 12}


def _padim(covariance: str, continual: str) -> dict:
    return {"model": {"name": "padim", "preset": "paper", "params": {"covariance": covariance, "continual": continual}}}


def _patchcore(continual: str, bank: int) -> dict:
    return {"model": {"name": "patchcore", "preset": "paper", "params": {"continual": continual, "bank_size": bank}}}


def _replay(model: str, size: int) -> dict:
    return {"model": {"name": model, "preset": "paper"}, "strategy": {"name": "replay", "replay_size": size}}


# row label -> (the run-config part it describes, {backbone column: "IF1 / PF1 / GFLOPs / MB"})
_MVTEC_ROWS: dict[str, tuple[dict, dict[str, str]]] = {
    "CFA, replay 100": (
        _replay("cfa", 100),
        {
            "MCUNet": "0.87 / 0.26 / 3.03 / 17.01",
            "MobileNet": "0.85 / 0.22 / 5.73 / 20.46",
            "PhiNet": "0.85 / 0.26 / 4.60 / 17.58",
        },
    ),
    "CFA, replay 40": (
        _replay("cfa", 40),
        {
            "MCUNet": "0.86 / 0.26 / 3.03 / 8.39",
            "MobileNet": "0.85 / 0.21 / 5.73 / 11.84",
            "PhiNet": "0.85 / 0.26 / 4.60 / 8.97",
        },
    ),
    "PaDiM multimodal": (
        _padim("full", "multimodal"),
        {
            "MCUNet": "0.93 / 0.44 / 2.24 / 447.82",
            "MobileNet": "0.94 / 0.50 / 11.96 / 1469.91",
            "PhiNet": "0.91 / 0.40 / 6.52 / 959.62",
        },
    ),
    "PaDiM unimodal": (
        _padim("full", "unimodal"),
        {
            "MCUNet": "0.88 / 0.30 / 0.36 / 29.86",
            "MobileNet": "0.89 / 0.34 / 1.22 / 98.00",
            "PhiNet": "0.86 / 0.29 / 0.81 / 63.98",
        },
    ),
    "PaDiM-Lite multimodal": (
        _padim("diagonal", "multimodal"),
        {
            "MCUNet": "0.91 / 0.37 / 0.34 / 25.59",
            "MobileNet": "0.90 / 0.41 / 0.57 / 46.67",
            "PhiNet": "0.88 / 0.31 / 0.52 / 37.63",
        },
    ),
    "PaDiM-Lite unimodal": (
        _padim("diagonal", "unimodal"),
        {
            "MCUNet": "0.85 / 0.15 / 0.23 / 1.71",
            "MobileNet": "0.84 / 0.13 / 0.46 / 3.11",
            "PhiNet": "0.84 / 0.15 / 0.41 / 2.51",
        },
    ),
    "PatchCoreCL 10k": (
        _patchcore("cl", 10_000),
        {
            "MCUNet": "0.95 / 0.33 / 10.52 / 6.06",
            "MobileNet": "0.93 / 0.34 / 17.77 / 12.11",
            "PhiNet": "0.94 / 0.35 / 14.72 / 8.14",
        },
    ),
    "PatchCoreCL 30k": (
        _patchcore("cl", 30_000),
        {
            "MCUNet": "0.96 / 0.36 / 27.84 / 16.45",
            "MobileNet": "0.95 / 0.38 / 49.16 / 31.04",
            "PhiNet": "0.96 / 0.40 / 40.08 / 23.41",
        },
    ),
    "PatchCoreCL++ 10k": (
        _patchcore("cl++", 10_000),
        {
            "MCUNet": "0.95 / 0.33 / 1.14 / 6.06",
            "MobileNet": "0.95 / 0.36 / 2.06 / 12.11",
            "PhiNet": "0.96 / 0.38 / 1.77 / 8.14",
        },
    ),
    "PatchCoreCL++ 30k": (
        _patchcore("cl++", 30_000),
        {
            "MCUNet": "0.96 / 0.36 / 2.29 / 16.45",
            "MobileNet": "0.96 / 0.39 / 4.15 / 31.04",
            "PhiNet": "0.96 / 0.41 / 3.46 / 23.41",
        },
    ),
    "STFPM, replay 100": (
        _replay("stfpm", 100),
        {
            "MCUNet": "0.90 / 0.37 / 0.45 / 16.19",
            "MobileNet": "0.91 / 0.42 / 0.90 / 19.82",
            "PhiNet": "0.87 / 0.33 / 0.81 / 15.43",
        },
    ),
    "STFPM, replay 40": (
        _replay("stfpm", 40),
        {
            "MCUNet": "0.89 / 0.34 / 0.45 / 7.58",
            "MobileNet": "0.90 / 0.40 / 0.90 / 11.21",
            "PhiNet": "0.87 / 0.31 / 0.81 / 6.82",
        },
    ),
    "SimpleNet, replay 100": (
        _replay("simplenet", 100),
        {
            "MCUNet": "0.84 / 0.14 / 0.53 / 15.36",
            "MobileNet": "0.87 / 0.27 / 1.20 / 17.41",
            "PhiNet": "0.84 / 0.13 / 0.93 / 15.14",
        },
    ),
    "SimpleNet, replay 40": (
        _replay("simplenet", 40),
        {
            "MCUNet": "0.84 / 0.15 / 0.53 / 6.74",
            "MobileNet": "0.87 / 0.28 / 1.20 / 8.80",
            "PhiNet": "0.84 / 0.13 / 0.93 / 6.52",
        },
    ),
    "PaSTe, replay 100": (
        _replay("paste", 100),
        {
            "MCUNet": "0.91 / 0.42 / 0.32 / 15.22",
            "MobileNet": "0.92 / 0.45 / 0.68 / 16.94",
            "PhiNet": "0.86 / 0.27 / 0.56 / 14.80",
        },
    ),
    "PaSTe, replay 40": (
        _replay("paste", 40),
        {
            "MCUNet": "0.90 / 0.41 / 0.32 / 6.60",
            "MobileNet": "0.92 / 0.45 / 0.68 / 8.32",
            "PhiNet": "0.86 / 0.26 / 0.56 / 6.18",
        },
    ),
    "Dinomaly, replay 100": (
        _replay("dinomaly", 100),
        {"DeiT Tiny": "0.88 / 0.45 / 3.39 / 50.87", "ViT Base": "0.89 / 0.40 / 68.56 / 575.66"},
    ),
    "Dinomaly, replay 40": (
        _replay("dinomaly", 40),
        {"DeiT Tiny": "0.88 / 0.44 / 3.39 / 42.25", "ViT Base": "0.90 / 0.42 / 68.56 / 567.04"},
    ),
}
# The VisA table: its own quality figures; efficiency as printed (identical to MVTec AD's). No PatchCoreCL rows.
_VISA_QUALITY: dict[str, dict[str, str]] = {
    "CFA, replay 100": {"MCUNet": "0.76 / 0.16", "MobileNet": "0.75 / 0.20", "PhiNet": "0.73 / 0.13"},
    "CFA, replay 40": {"MCUNet": "0.76 / 0.12", "MobileNet": "0.75 / 0.17", "PhiNet": "0.72 / 0.10"},
    "PaDiM multimodal": {"MCUNet": "0.83 / 0.24", "MobileNet": "0.84 / 0.29", "PhiNet": "0.82 / 0.24"},
    "PaDiM unimodal": {"MCUNet": "0.77 / 0.17", "MobileNet": "0.77 / 0.22", "PhiNet": "0.76 / 0.13"},
    "PaDiM-Lite multimodal": {"MCUNet": "0.79 / 0.18", "MobileNet": "0.79 / 0.21", "PhiNet": "0.77 / 0.14"},
    "PaDiM-Lite unimodal": {"MCUNet": "0.74 / 0.07", "MobileNet": "0.73 / 0.04", "PhiNet": "0.74 / 0.04"},
    "PatchCoreCL++ 10k": {"MCUNet": "0.85 / 0.05", "MobileNet": "0.86 / 0.06", "PhiNet": "0.86 / 0.06"},
    "PatchCoreCL++ 30k": {"MCUNet": "0.88 / 0.07", "MobileNet": "0.88 / 0.07", "PhiNet": "0.89 / 0.07"},
    "STFPM, replay 100": {"MCUNet": "0.76 / 0.17", "MobileNet": "0.79 / 0.20", "PhiNet": "0.74 / 0.12"},
    "STFPM, replay 40": {"MCUNet": "0.77 / 0.18", "MobileNet": "0.80 / 0.24", "PhiNet": "0.73 / 0.02"},
    "SimpleNet, replay 100": {"MCUNet": "0.73 / 0.07", "MobileNet": "0.74 / 0.14", "PhiNet": "0.72 / 0.06"},
    "SimpleNet, replay 40": {"MCUNet": "0.73 / 0.05", "MobileNet": "0.73 / 0.14", "PhiNet": "0.73 / 0.06"},
    "PaSTe, replay 100": {"MCUNet": "0.77 / 0.24", "MobileNet": "0.78 / 0.28", "PhiNet": "0.73 / 0.02"},
    "PaSTe, replay 40": {"MCUNet": "0.78 / 0.20", "MobileNet": "0.79 / 0.25", "PhiNet": "0.73 / 0.04"},
    "Dinomaly, replay 100": {"DeiT Tiny": "0.78 / 0.33", "ViT Base": "0.81 / 0.32"},
    "Dinomaly, replay 40": {"DeiT Tiny": "0.77 / 0.33", "ViT Base": "0.86 / 0.38"},
}


@dataclass(frozen=True)
class PublishedCell:
    """One published result: dataset, row, backbone, the four figures and the cvad config part it describes."""

    dataset: str  # "mvtec" | "visa"
    row: str
    backbone: str  # cvad backbone name
    image_f1: float
    pixel_f1: float
    gflops: float  # 2 x multiply-adds
    memory_mb: float  # 2^20 bytes
    config: dict  # model (with preset) and strategy; dataset, backbone and tasks come from the fields above

    @property
    def tasks(self) -> int:
        return TASKS[self.dataset]

    def run_config(self) -> dict:
        """A raw run config (validate with ``cvad.config.validate_config``) of this cell's configuration."""
        strategy = self.config.get("strategy", {"name": "finetune"})
        return {
            "dataset": {"name": "builtin", "image_size": 224},
            "model": self.config["model"],
            "backbone": {"name": self.backbone},
            "strategy": strategy,
        }


def _cells() -> list[PublishedCell]:
    cells = []
    for row, (config, columns) in _MVTEC_ROWS.items():
        for column, text in columns.items():
            image_f1, pixel_f1, gflops, mb = (float(v) for v in text.split(" / "))
            backbone = BACKBONE_COLUMNS[column]
            cells.append(PublishedCell("mvtec", row, backbone, image_f1, pixel_f1, gflops, mb, config))
            if row in _VISA_QUALITY:
                visa_f1s = (float(v) for v in _VISA_QUALITY[row][column].split(" / "))
                cells.append(PublishedCell("visa", row, backbone, *visa_f1s, gflops, mb, config))
    # In the text (section 5): PatchCoreCL with WideResNet50 and a 30k bank on MVTec AD.
    cells.append(
        PublishedCell(
            "mvtec", "PatchCoreCL 30k", "wide_resnet50_2", 0.977, 0.466, 357.77, 299.92, _patchcore("cl", 30_000)
        )
    )
    return cells


PUBLISHED: list[PublishedCell] = _cells()
