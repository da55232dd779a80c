"""PaSTe: STFPM with a partially shared student (methods.md section 6).

The student reuses the teacher's first blocks, frozen, up to and including the block
``shared`` names (a stride: the last block at that stride; or a block name), and learns only
the later ones. At inference the shared
layers run once and feed both the teacher's continuation and the student; they are stored
once. The loss and the map use the levels after the split (strides 8 and 16 by default), so
PaSTe costs fewer parameters and GFLOPs than STFPM on the same backbone. The paper's
configuration shares everything up to stride 8 (``shared: 8``) and taps three levels after it.

Training, schedules and the map follow STFPM (``cvad.models.stfpm``).
"""

from __future__ import annotations

from pydantic import Field

from cvad.backbones import resolve_layers
from cvad.models.paper import STUDENT_TEACHER_LAYERS
from cvad.models.stfpm import STFPM, STFPMParams


class PaSTeParams(STFPMParams):
    shared: int | str = Field(
        4, description="the student shares the teacher's blocks up to this one: a stride (its last block) or a block name"
    )


class PaSTe(STFPM):
    name = "paste"
    Params = PaSTeParams
    PAPER_CONFIG = {backbone: {"layers": layers, "shared": shared} for backbone, (layers, shared) in STUDENT_TEACHER_LAYERS.items()}

    def shared_layers(self, levels: list[int]) -> int:
        split = resolve_layers(self.backbone.name, (self.params.shared,))[0] + 1
        if split > max(levels):
            raise ValueError(
                f"paste: shared={self.params.shared!r} shares every feature level {list(self.params.layers)}; "
                "share fewer blocks, or tap a deeper level"
            )
        return split
