"""The contract every anomaly-detection method implements.

A method is a plain ``nn.Module``: it knows nothing of strategies, trackers or sweeps.
The continual protocol (``cvad.continual``) hands it one task at a time and scores
test images with its ``forward``; efficiency accounting reads ``stored_tensors``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from cvad.backbones import FeatureExtractor
from cvad.backbones.weights import WeightsInfo
from cvad.methods.base import MethodParams, MethodSpec, Setup, SetupError, feature_layers
from cvad.models.components.frozen import FeatureStore
from cvad.progress import Listener, ignore

__all__ = [  # with the torch-free part of the contract, cvad.methods.base
    "AnomalyModel", "AnomalyOutput", "ImageBatches", "MethodParams", "MethodSpec", "Setup", "SetupError", "Task",
    "TensorList", "feature_layers",
]  # fmt: skip


class AnomalyOutput(NamedTuple):
    """What inference returns for a batch of B images of size S."""

    image_scores: torch.Tensor  # [B], higher = more anomalous
    anomaly_maps: torch.Tensor  # [B, S, S], at input resolution
    # Methods that identify each image's task themselves (PatchCoreCL, CL++): the 0-based task
    # index they routed each image to, [B]; the protocol scores routing accuracy with it.
    routed_tasks: torch.Tensor | None = None


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
    report: Listener = ignore  # where trained methods report their passes (cvad.progress.TrainPass)
    tasks_covered: int = 1  # categories this step trains on: T for a joint step
    # Frozen networks' outputs per training image, kept across the steps of a run (and a sweep's runs).
    features: FeatureStore = field(default_factory=FeatureStore)


class AnomalyModel(MethodSpec, nn.Module, ABC):
    """The contract of an anomaly-detection method: fit a task, score images, report what it stores.

    A method's model subclasses its torch-free declaration (``cvad.methods.<name>``, a
    :class:`~cvad.methods.base.MethodSpec`: ``name``, ``Params``, the paper preset, ``check_setup``)
    and this class, and implements ``fit_task``, ``forward`` and ``stored_tensors``; it may refine
    ``shape_as_fitted``. It is built as ``Method(params, setup)``. Rules the shared tests hold every
    method to:

    - ``forward`` is the whole deployed inference path (backbone, heads, scoring, task routing):
      GFLOPs are counted by tracing it, and it must not change the model's state;
    - everything ``stored_tensors`` lists is a registered parameter or buffer, so ``.to()`` and
      ``state_dict()`` carry the fitted state;
    - the same seed and data give the same outputs; a non-finite training loss raises
      ``TrainingDivergedError`` (the shared loop in ``components.training`` does both).
    """

    def __init__(self, params: MethodParams, setup: Setup) -> None:
        super().__init__()
        self.params = params
        self.setup = setup

    @abstractmethod
    def fit_task(self, task: Task) -> None:
        """Learn ``task``, keeping whatever the method keeps of earlier tasks."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Score float images in [0, 1], shape [B, 3, S, S]."""

    @abstractmethod
    def stored_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor the deployed model stores, grouped by part (e.g. "backbone", "gaussians").

        A tensor shared by two parts is counted once by the accounting.
        """

    def shape_as_fitted(self, tasks: int) -> None:
        """Hold placeholder tensors of the shapes this model stores after ``tasks`` tasks.

        ``cvad cost`` prices a configuration this way, without data or training: memory and
        GFLOPs depend on the shapes of the stored state (banks, Gaussians, prototypes), not on
        its values. Methods whose stored state does not grow with tasks keep this default.
        """

    def frozen_extractors(self) -> dict[str, FeatureExtractor]:
        """The frozen pretrained networks by module path: rebuilt from their weight source, never stored with a fit."""
        return {path: module for path, module in self.named_modules() if isinstance(module, FeatureExtractor)}

    def frozen_prefixes(self) -> tuple[str, ...]:
        """The ``state_dict`` key prefixes of the frozen extractors."""
        return tuple(f"{path}." for path in self.frozen_extractors())

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """What fitting changed: ``state_dict()`` without the frozen extractors (see ``cvad.detector``)."""
        frozen = self.frozen_prefixes()
        return {key: value for key, value in self.state_dict().items() if not key.startswith(frozen)}

    def load_fitted(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a ``fitted_state()`` of a model built with the same parameters and setup.

        Stored tensors whose shapes depend on the data (banks, Gaussians, prototypes) take the
        saved shapes; every other key must match exactly, and nothing but the frozen extractors
        may be missing.
        """
        for prefix, module in self.named_modules():
            if isinstance(module, TensorList):  # as many placeholders as the saved list holds
                count = sum(1 for key in state if key.rpartition(".")[0] == prefix and key.rpartition(".")[2].isdigit())
                module.assign([torch.empty(0)] * count)
        for key, value in state.items():
            path, _, name = key.rpartition(".")
            owner = self.get_submodule(path) if path else self
            if name in owner._buffers:  # data-shaped state (a None buffer included): take the saved shape
                owner._buffers[name] = torch.empty_like(value)
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        frozen = self.frozen_prefixes()
        missing = [key for key in missing if not key.startswith(frozen)]
        if missing or unexpected:
            raise KeyError(
                f"{self.name}: the saved state does not fit this configuration "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )

    @property
    def weights(self) -> WeightsInfo:
        """Where the pretrained network's weights came from (recorded in every result): the model's
        feature extractor."""
        extractor = next((m for m in self.modules() if isinstance(m, FeatureExtractor)), None)
        if extractor is None:
            raise TypeError(f"{type(self).__name__} holds no FeatureExtractor; override AnomalyModel.weights")
        return extractor.weights


class TensorList(nn.Module):
    """A list of tensors kept as buffers ("0", "1", ...), so ``.to()`` and ``state_dict()`` carry them.

    For stored state whose count changes as tasks arrive (PatchCore's per-task banks).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def assign(self, tensors: list[torch.Tensor]) -> None:
        """Replace the whole list."""
        for index in range(self.count):
            delattr(self, str(index))
        for index, tensor in enumerate(tensors):
            self.register_buffer(str(index), tensor)
        self.count = len(tensors)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} tensors")
        return getattr(self, str(index % self.count))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (getattr(self, str(index)) for index in range(self.count))

    def __len__(self) -> int:
        return self.count
