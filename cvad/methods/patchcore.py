"""PatchCore's declaration (the model: ``cvad.models.patchcore``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cvad.catalog import Layers, resolve_layers, taps
from cvad.methods.base import MethodParams, MethodSpec, Setup, SetupError, feature_layers
from cvad.methods.paper import DESCRIPTOR_LAYERS


class PatchCoreParams(MethodParams):
    layers: Layers = feature_layers((8, 16))
    continual: Literal["refit", "cl", "cl++"] = "refit"
    bank_size: int | None = Field(10_000, ge=1, description="patch vectors kept in total (B)")
    bank_ratio: float | None = Field(
        None, gt=0, le=1, description="refit only: keep this fraction of the patches instead"
    )
    projection_dim: int | None = Field(128, ge=1, description="random projection used only to speed up k-center")
    num_neighbors: int = Field(9, ge=1, description="b in the image-score reweighting")
    prototype: Literal["map", "pooled"] = Field(
        "map", description="cl++ routing prototype: the mean deepest map, or its spatial average"
    )
    blur_sigma: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def one_bank_budget(self) -> PatchCoreParams:
        if self.bank_ratio is not None and self.continual != "refit":
            raise ValueError("bank_ratio applies to continual 'refit' only; CL variants share a total bank_size B")
        if self.bank_ratio is None and self.bank_size is None:
            raise ValueError("give bank_size (a count) or bank_ratio (a fraction)")
        return self


class PatchCoreSpec(MethodSpec):
    name = "patchcore"
    Params = PatchCoreParams
    PAPER_CONFIG = {
        backbone: {"layers": layers, "prototype": "pooled"} for backbone, layers in DESCRIPTOR_LAYERS.items()
    }

    MEMORY_FORMATS = ("fp32", "fp16", "int8", "pq")

    @classmethod
    def check_compression(cls, params: PatchCoreParams, setup: Setup) -> None:
        """Product quantization cuts each descriptor into equal sub-vectors."""
        super().check_compression(params, setup)
        compression = setup.compression
        if compression.memory != "pq":
            return
        width = sum(taps(setup.backbone)[i].channels for i in resolve_layers(setup.backbone, tuple(params.layers)))
        if width % compression.pq_subvectors:
            fitting = [m for m in (4, 8, 16, 32, 64) if width % m == 0]
            raise SetupError(
                f"patchcore: compression.pq_subvectors {compression.pq_subvectors} does not divide the "
                f"{width} features of a descriptor ({setup.backbone}, layers {list(params.layers)}); "
                f"choose one that does: {', '.join(map(str, fitting)) or 'a divisor of ' + str(width)}"
            )

    @classmethod
    def check_setup(cls, params: PatchCoreParams, setup: Setup) -> None:
        """A CL bank of B patches shares B among the tasks: at least one each."""
        super().check_setup(params, setup)
        if params.continual != "refit" and setup.tasks is not None and params.bank_size < setup.tasks:
            raise SetupError(
                f"patchcore: bank_size {params.bank_size} cannot hold a bank for each of the stream's "
                f"{setup.tasks} tasks (continual {params.continual!r} keeps floor(B/T) patches per task); "
                f"raise model.params.bank_size to at least {setup.tasks}"
            )
