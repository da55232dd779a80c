"""PaSTe: STFPM with a partially shared student (methods.md section 6).

The student reuses the teacher's first layers, frozen, up to and including the first
``shared_levels`` feature levels, and learns only the later ones. At inference the shared
layers run once and feed both the teacher's continuation and the student; they are stored
once. The loss and the map use the levels after the split (strides 8 and 16 by default), so
PaSTe costs fewer parameters and GFLOPs than STFPM on the same backbone.

Training, schedules and the map follow STFPM (``cvad.models.stfpm``).
"""

from __future__ import annotations

from pydantic import Field

from cvad.models.stfpm import STFPM, STFPMParams


class PaSTeParams(STFPMParams):
    shared_levels: int = Field(1, ge=1, description="feature levels (shallowest first) whose layers the student shares with the teacher")


class PaSTe(STFPM):
    name = "paste"
    Params = PaSTeParams

    def shared_layers(self, levels: list[int]) -> int:
        if self.params.shared_levels >= len(levels):
            raise ValueError(
                f"paste: shared_levels={self.params.shared_levels} shares all {len(levels)} feature levels "
                f"{self.params.feature_strides}; share fewer, or request a deeper level"
            )
        return levels[self.params.shared_levels - 1] + 1
