"""PaDiM's declaration (the model: ``cvad.models.padim``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvad.catalog import Layers
from cvad.methods.base import MethodParams, MethodSpec, feature_layers
from cvad.methods.paper import DESCRIPTOR_LAYERS, PADIM_FEATURES


class PaDiMParams(MethodParams):
    layers: Layers = feature_layers((4, 8, 16))
    n_features: int | None = Field(100, ge=1, description="random channel subset d (seeded); null keeps all channels")
    covariance: Literal["full", "diagonal"] = "full"
    continual: Literal["refit", "original", "unimodal", "multimodal"] = "refit"
    epsilon: float = Field(0.01, gt=0)
    blur_sigma: float = Field(4.0, gt=0)


class PaDiMSpec(MethodSpec):
    name = "padim"
    MEMORY_FORMATS = ("fp32", "fp16")
    MEMORY_LIMIT = (
        "its variances and inverse-covariance factors span orders of magnitude across positions, so one 8-bit "
        "scale per feature would leave the smallest a few levels"
    )
    Params = PaDiMParams
    PAPER_CONFIG = {backbone: {"layers": layers} for backbone, layers in DESCRIPTOR_LAYERS.items()}

    @classmethod
    def paper_preset(cls, backbone: str, params: dict) -> dict:
        """The descriptor layers, and the channel subset d the paper's MB implies for the chosen covariance."""
        covariance = params.get("covariance", PaDiMParams.model_fields["covariance"].default)
        return super().paper_preset(backbone, params) | {"n_features": PADIM_FEATURES[backbone][covariance]}
