"""PaSTe's declaration (the model: ``cvad.models.paste``): STFPM's, with the blocks the student shares."""

from __future__ import annotations

from pydantic import Field

from cvad.catalog import resolve_layers
from cvad.methods.base import SetupError
from cvad.methods.paper import STUDENT_TEACHER_LAYERS
from cvad.methods.stfpm import STFPMParams, STFPMSpec


class PaSTeParams(STFPMParams):
    shared: int | str = Field(
        4,
        description="the student shares the teacher's blocks up to this one: a stride (its last block) or a block name",
    )


class PaSTeSpec(STFPMSpec):
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
