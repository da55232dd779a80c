"""PaSTe: STFPM with a partially shared student (docs/methods.md section 6).

The student reuses the teacher's first blocks, frozen, up to and including the block
``shared`` names (a stride: the last block at that stride; or a block name), and learns only
the later ones. At inference the shared
layers run once and feed both the teacher's continuation and the student; they are stored
once. The loss and the map use the levels after the split (strides 8 and 16 by default), so
PaSTe costs fewer parameters and GFLOPs than STFPM on the same backbone. The paper preset's split
is per backbone (``cvad.models.paper.STUDENT_TEACHER_LAYERS``; on MobileNetV2 everything up to
stride 8).

Training, schedules and the map follow STFPM (``cvad.models.stfpm``).
"""

from __future__ import annotations

from pydantic import Field

from cvad.backbones import resolve_layers
from cvad.models.base import SetupError
from cvad.models.paper import STUDENT_TEACHER_LAYERS
from cvad.models.stfpm import STFPM, STFPMParams


class PaSTeParams(STFPMParams):
    shared: int | str = Field(
        4,
        description="the student shares the teacher's blocks up to this one: a stride (its last block) or a block name",
    )


class PaSTe(STFPM):
    name = "paste"
    Params = PaSTeParams
    PAPER_CONFIG = {
        backbone: {"layers": layers, "shared": shared} for backbone, (layers, shared) in STUDENT_TEACHER_LAYERS.items()
    }

    @classmethod
    def shared_layers(cls, params: PaSTeParams, backbone: str) -> int:
        """Blocks up to and including ``shared``; at least the deepest tapped level must be left to the student."""
        try:
            split = resolve_layers(backbone, (params.shared,))[0] + 1
        except ValueError as exc:
            raise SetupError(f"paste: model.params.shared: {exc}") from None
        if split > max(resolve_layers(backbone, tuple(params.layers))):
            raise SetupError(
                f"paste: shared={params.shared!r} shares every feature level {list(params.layers)} of {backbone}; "
                "share fewer blocks, or tap a deeper level"
            )
        return split
