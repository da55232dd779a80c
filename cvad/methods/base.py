"""What a method declares before any model exists: its parameters, the paper's preset and its setup checks.

Torch-free, so that config validation refuses a bad config at once. Each method's
``cvad.methods.<name>`` subclasses :class:`MethodSpec`; its model (``cvad.models.<name>``)
subclasses that declaration and ``cvad.models.base.AnomalyModel``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cvad.catalog import resolve_layers
from cvad.compression import CompressionConfig


@dataclass(frozen=True)
class Setup:
    """What every method is built from besides its own parameters (the run config's other sections)."""

    backbone: str  # a registered backbone name
    weights: str = "imagenet"  # imagenet | random | a checkpoint path
    image_size: int = 224  # square input side, px
    seed: int = 0
    tasks: int | None = None  # tasks in the stream when known before the data is read (stored state may depend on it)
    compression: CompressionConfig = CompressionConfig()  # how stored state and backbone weights are kept


class SetupError(ValueError):
    """A method cannot be built on this backbone, image size or stream; the message says what to change."""


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


class TrainingParams(MethodParams):
    """Parameters every method that learns weights shares (its loop: ``cvad.models.components.training``).

    Each trained method sets its own defaults: small CPU-friendly schedules for the built-in data;
    ``PAPER_TRAINING`` holds the original paper's schedule for real data (used by the paper preset).
    The training batch size is ``dataset.batch_size``.
    """

    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="optimiser of the trained parts")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only)")
    steps: int | None = Field(
        40, ge=1, description="optimizer updates per task a step trains on (a joint step over T tasks: T x steps)"
    )
    epochs: int | None = Field(None, ge=1, description="instead of steps: passes over each step's images (plus replay)")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value; null: no clipping")

    @model_validator(mode="before")
    @classmethod
    def epochs_replace_steps(cls, data: object) -> object:
        """Giving ``epochs`` alone asks for an epoch budget: the default ``steps`` steps aside."""
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            return {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def one_budget(self) -> TrainingParams:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                "give one training budget: steps (updates per task) or epochs (passes), "
                f"got steps={self.steps}, epochs={self.epochs}"
            )
        return self


class MethodSpec:
    """A method as config validation knows it: ``name``, ``Params``, the paper's preset, ``check_setup``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # The paper's configuration (``model.preset: paper``): the method's original training schedule,
    # and per backbone the settings the paper's efficiency figures imply (cvad.methods.paper).
    PAPER_TRAINING: ClassVar[dict] = {}
    PAPER_CONFIG: ClassVar[dict[str, dict]] = {}
    # The ``compression.memory`` formats its stored state can be kept in, and why no other (docs/methods.md section 9).
    MEMORY_FORMATS: ClassVar[tuple[str, ...]] = ("fp32",)
    MEMORY_LIMIT: ClassVar[str] = (
        "what it stores besides the backbone is trained network weights, used as they were trained"
    )

    @classmethod
    def check_compression(cls, params: MethodParams, setup: Setup) -> None:
        """Raise :class:`SetupError` if the method cannot keep its stored state as ``setup.compression`` asks."""
        memory = setup.compression.memory
        if memory not in cls.MEMORY_FORMATS:
            raise SetupError(
                f"{cls.name}: compression.memory {memory!r} is not available: {cls.MEMORY_LIMIT}; it keeps its "
                f"state as {', '.join(cls.MEMORY_FORMATS)} (compression.backbone compresses any method's backbone)"
            )

    @classmethod
    def check_setup(cls, params: MethodParams, setup: Setup) -> None:
        """Raise :class:`SetupError` if ``params`` cannot work on ``setup``; run at config validation, before any data.

        The base checks that the feature taps in ``params.layers`` exist on the backbone
        (``cvad.catalog.taps``: known without building it).
        """
        layers = getattr(params, "layers", None)
        if layers is not None:
            try:
                resolve_layers(setup.backbone, tuple(layers))
            except ValueError as exc:
                raise SetupError(f"{cls.name}: model.params.layers: {exc}") from None

    @classmethod
    def paper_preset(cls, backbone: str, params: dict) -> dict:
        """The paper's parameters for this method on ``backbone``; ``params`` (given by the user) win over them."""
        if cls.PAPER_CONFIG and backbone not in cls.PAPER_CONFIG:
            raise ValueError(
                f"the paper ran {cls.name} on {', '.join(cls.PAPER_CONFIG)}, not on {backbone}; "
                "drop model.preset or choose one of those backbones"
            )
        return cls.PAPER_TRAINING | cls.PAPER_CONFIG.get(backbone, {})
