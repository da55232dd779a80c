"""How a detector keeps its bytes on the device: the run config's ``compression`` section (docs/methods.md section 9).

Torch-free, so that config validation refuses an unsupported choice at once. What each choice
stores is in ``cvad.models.components.stored``; the protocol computes with exactly what is stored
(decoded on every use), so every metric a run records is the compressed detector's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MemoryFormat = Literal["fp32", "fp16", "int8", "pq"]
ReplayFormat = Literal["raw", "jpeg"]
WeightFormat = Literal["fp32", "fp16", "int8"]


class CompressionConfig(BaseModel):
    """Stored state, replay images and backbone weights, each in the form the device keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory: MemoryFormat = Field(
        "fp32",
        description="the method's stored state (banks, Gaussians, prototypes, CFA memory): fp32; fp16; "
        "int8 (8-bit codes with a scale and offset per feature); pq (PatchCore banks: product quantization)",
    )
    pq_subvectors: int = Field(
        16, ge=1, description="pq: sub-vectors per descriptor (bytes per bank entry); ignored by the other formats"
    )
    pq_centroids: int = Field(256, ge=2, le=256, description="pq: centroids per sub-vector codebook (codes are 1 B)")
    replay: ReplayFormat = Field("raw", description="replay buffer images: raw uint8 pixels, or JPEG bytes")
    replay_quality: int = Field(95, ge=1, le=100, description="jpeg: the encoder's quality (1-100)")
    backbone: WeightFormat = Field(
        "fp32",
        description="the frozen backbone's weights: fp32; fp16; int8 (weight-only, per output channel); "
        "computed as the dequantised weights a weight-only runtime uses",
    )

    @property
    def compressed(self) -> bool:
        return (self.memory, self.replay, self.backbone) != ("fp32", "raw", "fp32")
