"""STFPM: student-teacher feature pyramid matching (docs/methods.md section 6).

A frozen pretrained teacher and a student of the same architecture, trained from scratch to
reproduce the teacher's features on normal images at three levels (strides 4, 8, 16 by
default). Loss: sum over levels of the mean over positions of ½‖n(F_t) − n(F_s)‖², with n the
channel-wise L2 normalisation. Where the student fails to follow the teacher, the image is
anomalous: the map is the product (or sum) over levels of the per-position losses, upsampled
to the input size (no blur, as in the original; ``blur_sigma`` adds one); image score = max.

Under the continual strategies the same student keeps training on whatever each task brings
(the new task; plus the buffer under replay; everything once under joint).

Defaults are a CPU-sized schedule for the built-in data (Adam 1e-3, 40 updates per task; joint
training: 40 x T); ``PAPER_TRAINING`` is the original paper's (SGD 0.4, momentum 0.9, weight
decay 1e-4, 100 epochs; the original's batch of 32 is ``dataset.batch_size``'s to set). The
teacher's outputs for a training image are computed once (``FrozenOutputs``), not once per
update.

Stored: the teacher (truncated after its deepest level), the student (the layers it learns)
and, with ``blur_sigma``, the map head's kernel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cvad.backbones import FeatureExtractor
from cvad.methods.stfpm import STFPMParams, STFPMSpec
from cvad.models.base import AnomalyModel, AnomalyOutput, Setup, Task
from cvad.models.components.frozen import FrozenOutputs, network_digest
from cvad.models.components.maps import GaussianBlur
from cvad.models.components.training import make_optimizer, train_loop


def run_layers(layers: list[nn.Module], x: torch.Tensor, start: int, outputs: list[int]) -> list[torch.Tensor]:
    """Run ``layers[start:]`` (index ``start`` first) on ``x``; collect the outputs at ``outputs``."""
    collected = []
    for index in range(start, max(outputs) + 1):
        x = layers[index](x)
        if index in outputs:
            collected.append(x)
    return collected


def reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh random weights (each layer's own default init), reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
            if hasattr(layer, "reset_running_stats"):
                layer.reset_running_stats()


class STFPM(STFPMSpec, AnomalyModel):
    params: STFPMParams

    def __init__(self, params: STFPMParams, setup: Setup) -> None:
        super().__init__(params, setup)
        self.check_setup(params, setup)
        self.backbone = FeatureExtractor(setup.backbone, params.layers, setup.weights)
        self.split = self.shared_layers(params, setup.backbone)
        self.levels = [i for i in self.backbone.tap_indices if i >= self.split]  # levels the student produces
        self.teacher_layers = list(self.backbone.blocks)
        self.student = nn.ModuleList(copy.deepcopy(self.teacher_layers[self.split : max(self.levels) + 1]))
        reinitialise(self.student, setup.seed)
        self.student.requires_grad_(True)
        self.blur = GaussianBlur(params.blur_sigma) if params.blur_sigma else None
        self.loss_history: list[list[float]] = []

    @torch.no_grad()
    def teacher_side(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen part: the student's input (the shared layers' output, or the normalised image) and
        the teacher's levels."""
        x = (images - self.backbone.mean) / self.backbone.std
        shared = run_layers(self.teacher_layers, x, 0, [self.split - 1])[0] if self.split else x
        return [shared, *run_layers(self.teacher_layers, shared, self.split, self.levels)]

    def features(
        self, images: torch.Tensor, frozen: FrozenOutputs | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student features at the student's levels; the shared layers run once."""
        shared, *teacher = (frozen or self.teacher_side)(images)
        student_layers = [None] * self.split + list(self.student)
        student = run_layers(student_layers, shared, self.split, self.levels)
        return teacher, student

    @staticmethod
    def level_distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
        """½‖n(F_t) − n(F_s)‖² per position, [B, h, w] per level."""
        return [
            0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1) for t, s in zip(teacher, student)
        ]

    def fit_task(self, task: Task) -> None:
        optimizer = make_optimizer(self.params, list(self.student.parameters()))
        returns = f"stfpm teacher side: split {self.split}, levels {self.levels}"
        frozen = FrozenOutputs(self.teacher_side, network_digest(self.backbone, returns), task.features)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            distances = self.level_distances(*self.features(images, frozen))
            return sum(d.mean() for d in distances)

        self.loss_history.append(train_loop(self, task, optimizer, loss_of))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        distances = self.level_distances(*self.features(images))
        size = (self.setup.image_size, self.setup.image_size)
        maps = [
            F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1) for d in distances
        ]
        combined = maps[0]
        for level in maps[1:]:
            combined = combined * level if self.params.combine == "product" else combined + level
        if self.blur is not None:
            combined = self.blur(combined)
        return AnomalyOutput(combined.flatten(1).amax(dim=1), combined)

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        parts = {
            "teacher": list(self.backbone.parameters()) + list(self.backbone.buffers()),
            "student": list(self.student.parameters()) + list(self.student.buffers()),
        }
        if self.blur is not None:
            parts["map_head"] = list(self.blur.buffers())
        return parts
