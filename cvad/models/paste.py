"""PaSTe: STFPM with a partially shared student (docs/methods.md section 6).

The student reuses the teacher's first blocks, frozen, up to and including the block
``shared`` names (a stride: the last block at that stride; or a block name), and learns only
the later ones. At inference the shared
layers run once and feed both the teacher's continuation and the student; they are stored
once. The loss and the map use the levels after the split (strides 8 and 16 by default), so
PaSTe costs fewer parameters and GFLOPs than STFPM on the same backbone. The paper preset's split
is per backbone (``cvad.methods.paper.STUDENT_TEACHER_LAYERS``; on MobileNetV2 everything up to
stride 8).

Training, schedules and the map follow STFPM (``cvad.models.stfpm``).
"""

from __future__ import annotations

from cvad.methods.paste import PaSTeSpec
from cvad.models.stfpm import STFPM


class PaSTe(PaSTeSpec, STFPM):
    """STFPM whose student shares the teacher's first blocks (which: ``PaSTeSpec.shared_layers``)."""
