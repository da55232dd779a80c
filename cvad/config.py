"""The experiment config: one validated record that fully determines a run.

Unknown keys, unknown names and bad values are rejected with the field's dotted path,
the value given and what is allowed. ``--set a.b=value`` overrides apply before
validation, so they are checked exactly like the file. Validation imports no torch and no model:
names are checked against ``cvad.catalog``, a method's parameters and setup against its declaration
(``cvad.methods``), so a bad config is refused at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cvad import catalog
from cvad.compression import CompressionConfig
from cvad.data.builtin import BuiltinOptions
from cvad.data.presets import TASK_PRESETS
from cvad.methods.base import Setup, SetupError


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(StrictModel):
    name: Literal["builtin", "mvtec", "visa", "folder"] = "builtin"
    root: Path | None = Field(None, description="dataset folder (mvtec, visa, folder)")
    tasks: list[str] | Literal["all", "mvtec-ad", "visa"] = Field(
        "all", description="categories in task order; 'all' (the dataset's order) or a benchmark preset"
    )
    image_size: int = Field(224, ge=32, le=1024, description="square model input size in px")
    batch_size: int = Field(8, ge=1, description="training batch size")
    eval_batch_size: int = Field(
        4, ge=1, description="images scored at once; on CPUs a few at a time run fastest (inference is memory-bound)"
    )
    builtin: BuiltinOptions = Field(default_factory=BuiltinOptions)
    cache_dir: Path | None = Field(
        None,
        description="folder for generated built-in datasets (default $CVAD_CACHE/builtin or ~/.cache/cvad/builtin)",
    )

    @model_validator(mode="after")
    def root_matches_name(self) -> DatasetConfig:
        if self.name != "builtin" and self.root is None:
            raise ValueError(
                f"dataset.root is required for dataset '{self.name}': give the folder that holds its categories"
            )
        if self.name == "builtin" and self.root is not None:
            raise ValueError(
                "dataset.root is not used by the built-in dataset; use dataset.cache_dir to move its cache"
            )
        if isinstance(self.tasks, list) and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"dataset.tasks lists a category twice: {self.tasks}")
        if isinstance(self.tasks, list) and not self.tasks:
            raise ValueError("dataset.tasks is empty; list at least one category or use 'all'")
        return self

    def declared_task_count(self) -> int | None:
        """Tasks the config itself fixes (a list, a preset, the built-in set); None where 'all' means a
        folder's categories."""
        if isinstance(self.tasks, list):
            return len(self.tasks)
        if self.tasks in TASK_PRESETS:
            return len(TASK_PRESETS[self.tasks])
        if self.name == "builtin":
            return len(self.builtin.categories)
        return None


class BackboneConfig(StrictModel):
    name: str = "mobilenetv2_100"
    weights: str = Field("imagenet", description="'imagenet', 'random' (explicitly untrained) or a checkpoint path")

    @field_validator("name")
    @classmethod
    def known_backbone(cls, name: str) -> str:
        if name not in catalog.BACKBONES:
            raise ValueError(catalog.BACKBONES.unknown_message(name))
        return name


class ModelConfig(StrictModel):
    name: str = "padim"
    preset: Literal["paper"] | None = Field(
        None, description="'paper': start from the paper's configuration for this backbone (params given here win)"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own parameters")

    @field_validator("name")
    @classmethod
    def known_model(cls, name: str) -> str:
        if name not in catalog.METHODS:
            raise ValueError(catalog.METHODS.unknown_message(name))
        return name


class StrategyConfig(StrictModel):
    name: Literal["finetune", "replay", "joint"] = "finetune"
    replay_size: int | None = Field(None, ge=1, description="images in the replay buffer (replay only)")

    @model_validator(mode="after")
    def replay_size_only_for_replay(self) -> StrategyConfig:
        if self.name == "replay" and self.replay_size is None:
            raise ValueError("strategy 'replay' needs strategy.replay_size (e.g. 40 or 100 images)")
        if self.name != "replay" and self.replay_size is not None:
            raise ValueError(f"strategy.replay_size applies only to strategy 'replay', not '{self.name}'")
        return self


class CalibrationConfig(StrictModel):
    """How each task's decision thresholds are set from defect-free images training did not see (docs/methods.md
    section 8)."""

    holdout: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of each task's train/good held out (seeded) to calibrate its thresholds; "
        "0: train on every image (the paper's protocol) and keep no thresholds",
    )
    image_fpr: float = Field(0.05, gt=0, lt=1, description="target share of good images flagged defective")
    pixel_fpr: float = Field(0.01, gt=0, lt=1, description="target share of good pixels flagged defective")
    min_images: int = Field(
        5, ge=1, description="fewest held-out images a task may be calibrated on; a task with fewer is refused"
    )

    @property
    def enabled(self) -> bool:
        return self.holdout > 0


class RunConfig(StrictModel):
    """One experiment: data, task order, model, backbone, strategy and seed."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    measure_latency: bool = True

    @model_validator(mode="after")
    def jpeg_replay_needs_replay(self) -> RunConfig:
        if self.compression.replay != "raw" and self.strategy.name != "replay":
            raise ValueError(
                f"compression.replay {self.compression.replay!r} applies to strategy 'replay', not "
                f"'{self.strategy.name}': there is no buffer to compress"
            )
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def setup(self, weights: str | None = None, tasks: int | None = None) -> Setup:
        """What the method is built from besides its parameters; ``tasks`` defaults to the count the config declares."""
        return Setup(
            backbone=self.backbone.name,
            weights=self.backbone.weights if weights is None else weights,
            image_size=self.dataset.image_size,
            seed=self.seed,
            tasks=self.dataset.declared_task_count() if tasks is None else tasks,
            compression=self.compression,
        )


def describe_errors(error: ValidationError, root: type[BaseModel], prefix: str = "") -> list[str]:
    """One readable line per problem: dotted field path, what is wrong, the value given.

    ``root`` is the model that was validated (``prefix`` its dotted place in the config).
    """
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = allowed_keys(root, item["loc"][:-1])
            message = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        elif not isinstance(item.get("input"), dict):  # a whole section as "value" would only be noise
            message += f" (got {item.get('input')!r})"
        lines.append(f"{path or '<config>'}: {message}")
    return lines


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section of ``root`` at ``loc``; empty if it cannot be resolved."""
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` strings onto a nested dict; values are parsed as YAML (numbers, lists, null)."""
    result = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. dataset.image_size=128")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        set_path(result, key.strip(), value)
    return result


def set_path(config: dict, path: str, value: Any) -> None:
    """Set the dotted key ``path`` ("model.params.bank_size") of a nested config to ``value``.

    ``config`` itself changes; each section on the way is copied first (so a dict it shares with
    another config stays as it was), or created where it is missing or not a mapping.
    """
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value


def validate_config(raw: dict) -> RunConfig:
    """A RunConfig with the method's parameters validated and their defaults filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a config must be a mapping of sections (dataset, backbone, model, strategy...), got {type(raw).__name__}"
        )
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("invalid config:\n  " + "\n  ".join(describe_errors(exc, RunConfig))) from None
    method = catalog.METHODS.get(config.model.name).spec_class()
    params = dict(config.model.params)
    if config.model.preset == "paper":
        try:
            params = method.paper_preset(config.backbone.name, params) | params
        except ValueError as exc:
            raise ConfigError(f"invalid config:\n  model.preset: {exc}") from None
    try:
        params = method.Params.model_validate(params)
    except ValidationError as exc:
        lines = describe_errors(exc, method.Params, prefix="model.params")
        raise ConfigError(f"invalid config for model {method.name}:\n  " + "\n  ".join(lines)) from None
    try:
        method.check_setup(params, config.setup())
        method.check_compression(params, config.setup())
    except SetupError as exc:
        raise ConfigError(
            f"invalid config for model {method.name} on backbone {config.backbone.name}:\n  {exc}"
        ) from None
    model = config.model.model_copy(update={"params": params.model_dump(mode="json")})
    return config.model_copy(update={"model": model})


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate_config(apply_overrides(raw, overrides or []))
