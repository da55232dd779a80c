"""CFA's declaration (the model: ``cvad.models.cfa``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from cvad.catalog import Layers
from cvad.methods.base import MethodSpec, TrainingParams, feature_layers
from cvad.methods.paper import DESCRIPTOR_LAYERS


class CFAParams(TrainingParams):
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    layers: Layers = feature_layers((4, 8, 16))
    compression: int = Field(
        1, ge=1, description="keep 1 in this many memory entries (greedy k-center); 1 keeps every position"
    )
    train_patches: int | None = Field(
        512, ge=1, description="patches per image drawn (seeded) for each update; null: every patch, as the original"
    )
    k: int = Field(3, ge=1, description="nearest memory features each feature is pulled towards")
    j: int = Field(3, ge=0, description="hard negatives pushed out, after the k nearest")
    radius: float = Field(1e-5, ge=0, description="hypersphere radius r")
    alpha: float = Field(0.1, ge=0, description="margin beyond r for the hard negatives")
    blur_sigma: float = Field(4.0, gt=0)
    score_margin: int = Field(
        16, ge=0, description="px along the border the image score (the map's maximum) leaves out; 0: the whole map"
    )


class CFASpec(MethodSpec):
    name = "cfa"
    MEMORY_FORMATS = ("fp32", "fp16", "int8")
    Params = CFAParams
    PAPER_TRAINING: ClassVar[dict] = {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 5e-4,
        "epochs": 30,
        "k": 3,
        "j": 3,
    }
    PAPER_CONFIG: ClassVar[dict[str, dict]] = {
        backbone: {"layers": layers} for backbone, layers in DESCRIPTOR_LAYERS.items()
    }
