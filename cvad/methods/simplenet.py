"""SimpleNet's declaration (the model: ``cvad.models.simplenet``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from cvad.catalog import Layers, resolve_layers, taps
from cvad.methods.base import MethodSpec, TrainingParams, feature_layers
from cvad.methods.paper import DESCRIPTOR_LAYERS


class SimpleNetParams(TrainingParams):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, description="discriminator learning rate")
    adaptor_lr_ratio: float = Field(
        0.5, gt=0, description="adaptor learning rate = lr x this (the original: 1e-4 / 2e-4)"
    )
    weight_decay: float = Field(1e-5, ge=0)
    layers: Layers = feature_layers((8, 16))
    hidden: int = Field(256, ge=1, description="discriminator hidden width (the original: 1024)")
    steps: int | None = Field(80, ge=1, description=TrainingParams.model_fields["steps"].description)
    noise_std: float = Field(
        0.1, gt=0, description="σ of the Gaussian noise that makes fake anomalies (the original: 0.015)"
    )
    threshold: float = Field(0.5, gt=0, description="margin of the truncated L1 loss")
    blur_sigma: float = Field(4.0, gt=0)


class SimpleNetSpec(MethodSpec):
    name = "simplenet"
    Params = SimpleNetParams
    PAPER_TRAINING: ClassVar[dict] = {
        "optimizer": "adam", "lr": 2e-4, "adaptor_lr_ratio": 0.5, "weight_decay": 1e-5, "epochs": 160,
        "noise_std": 0.015,
    }  # fmt: skip
    PAPER_CONFIG: ClassVar[dict[str, dict]] = {
        backbone: {"layers": layers} for backbone, layers in DESCRIPTOR_LAYERS.items()
    }

    @classmethod
    def paper_preset(cls, backbone: str, params: dict) -> dict:
        """The descriptor layers, with a discriminator as wide as the features (what the paper's MB and
        GFLOPs imply)."""
        preset = super().paper_preset(backbone, params)
        layers = params.get("layers", preset["layers"])
        return preset | {"hidden": sum(taps(backbone)[i].channels for i in resolve_layers(backbone, tuple(layers)))}
