"""STFPM's declaration (the model: ``cvad.models.stfpm``); PaSTe's extends it."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from cvad import catalog
from cvad.catalog import Layers
from cvad.methods.base import MethodSpec, Setup, SetupError, TrainingParams, feature_layers
from cvad.methods.paper import STUDENT_TEACHER_LAYERS


class STFPMParams(TrainingParams):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    layers: Layers = feature_layers((4, 8, 16))
    combine: Literal["product", "sum"] = Field("product", description="how per-level maps combine into one")
    blur_sigma: float | None = Field(
        None, gt=0, description="Gaussian blur of the final map; null: none (the original)"
    )


class STFPMSpec(MethodSpec):
    name = "stfpm"
    Params = STFPMParams
    PAPER_TRAINING: ClassVar[dict] = {
        "optimizer": "sgd",
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "epochs": 100,
    }
    PAPER_CONFIG: ClassVar[dict[str, dict]] = {
        backbone: {"layers": layers} for backbone, (layers, _) in STUDENT_TEACHER_LAYERS.items()
    }

    @classmethod
    def check_setup(cls, params: STFPMParams, setup: Setup) -> None:
        """The student copies the teacher's blocks: the backbone must be a CNN, and a level must be left to learn."""
        if catalog.BACKBONES.get(setup.backbone).is_vit:
            raise SetupError(
                f"{cls.name}: backbone {setup.backbone} is not a convolutional network; STFPM and PaSTe need a CNN "
                "teacher (choose e.g. mobilenetv2_100)"
            )
        super().check_setup(params, setup)
        cls.shared_layers(params, setup.backbone)

    @classmethod
    def shared_layers(cls, params: STFPMParams, backbone: str) -> int:
        """How many of the teacher's first blocks the student shares: none for STFPM."""
        return 0
