"""The contract every anomaly-detection method implements.

A method is a plain ``nn.Module``: it knows nothing of strategies, trackers or sweeps.
The continual protocol (``cvad.continual``) hands it one task at a time and scores
test images with its ``forward``; efficiency accounting reads ``stored_tensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cvad.backbones.weights import WeightsInfo
from cvad.models.components.frozen import FeatureStore


class AnomalyOutput(NamedTuple):
    """What inference returns for a batch of B images of size S."""

    image_scores: torch.Tensor  # [B], higher = more anomalous
    anomaly_maps: torch.Tensor  # [B, S, S], at input resolution


class MethodParams(BaseModel):
    """Base of every method's hyper-parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def feature_layers(default: tuple[int | str, ...]) -> Any:
    """The ``layers`` field every backbone-tapping method shares."""
    return Field(
        default,
        min_length=1,
        description="feature taps, shallowest first: a stride (the last block at that stride) "
        "or a block name (cvad list --taps BACKBONE)",
    )


class ImageBatches:
    """Re-iterable batches of float images in [0, 1], shape [B, 3, S, S].

    Wraps a loader of uint8 batches so that trained methods can run several epochs.
    """

    def __init__(self, loader, device: torch.device | str = "cpu") -> None:
        self.loader = loader
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.loader:
            yield batch["image"].to(self.device).float().div_(255.0)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class Task:
    """One step of the continual stream, as a method sees it."""

    index: int  # 0-based position in the stream
    name: str  # category name(s); "a+b+..." for a joint step
    train: ImageBatches  # this task's normal images (plus the replay buffer, if any)
    # Progress hook for trained methods, e.g. report("train_epoch", {"epoch": 1, "loss": 0.3}).
    report: Callable[[str, dict], None] = lambda event, info: None
    tasks_covered: int = 1  # categories this step trains on: T for a joint step
    # Frozen networks' outputs per training image, kept across the steps of a run (and a sweep's runs).
    features: FeatureStore = field(default_factory=FeatureStore)


class AnomalyModel(nn.Module):
    """Fit a task, score images, report what must be stored.

    Subclasses set ``name`` and ``Params`` and implement the three methods below.
    ``forward`` must be the whole deployed inference path (backbone, heads,
    scoring, task routing), because GFLOPs are counted by tracing it.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # The paper's configuration (``model.preset: paper``): the method's original training schedule,
    # and per backbone the settings the paper's efficiency figures imply (cvad.models.paper).
    PAPER_TRAINING: ClassVar[dict] = {}
    PAPER_CONFIG: ClassVar[dict[str, dict]] = {}
    # Methods that identify the task of a test image themselves (PatchCoreCL, CL++) set this
    # after each forward to the 0-based task index per image; the protocol scores routing.
    routed_tasks: torch.Tensor | None = None

    @classmethod
    def paper_preset(cls, backbone: str, params: dict) -> dict:
        """The paper's parameters for this method on ``backbone``; ``params`` (given by the user) win over them."""
        if cls.PAPER_CONFIG and backbone not in cls.PAPER_CONFIG:
            raise ValueError(
                f"the paper ran {cls.name} on {', '.join(cls.PAPER_CONFIG)}, not on {backbone}; "
                "drop model.preset or choose one of those backbones"
            )
        return cls.PAPER_TRAINING | cls.PAPER_CONFIG.get(backbone, {})

    def fit_task(self, task: Task) -> None:
        """Learn ``task``, keeping whatever the method keeps of earlier tasks."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Score float images in [0, 1], shape [B, 3, S, S]."""
        raise NotImplementedError

    @property
    def weights(self) -> WeightsInfo:
        """Where the pretrained network's weights came from (recorded in every result).

        Methods keep their pretrained network as ``self.backbone``; others override this.
        """
        return self.backbone.weights

    def shape_as_fitted(self, tasks: int) -> None:
        """Hold placeholder tensors of the shapes this model stores after ``tasks`` tasks.

        ``cvad cost`` prices a configuration this way, without data or training: memory and
        GFLOPs depend on the shapes of the stored state (banks, Gaussians, prototypes), not on
        its values. Methods whose stored state does not grow with tasks keep this default.
        """

    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor the deployed model stores, grouped by part (e.g. "backbone", "gaussians").

        A tensor shared by two parts is counted once by the accounting.
        """
        raise NotImplementedError
