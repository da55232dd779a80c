"""A sweep file: fixed run settings, a search space, and how to search it.

Layout (see sweeps/edge.yaml)::

    sweep:            # how to search: name, sampler, objectives, constraints, resources
    space:            # what to search (cvad.sweep.space)
    dataset: ...      # everything else is a fixed part of every trial's run config
    seed: 0

``--set dataset.name=mvtec`` overrides apply to the whole file before validation.
Every configuration the space can produce is validated as a run config up front (a space too
large for that: a covering set, each branch and value once), so a typo in one branch fails before
the first trial starts.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cvad.config import (
    ConfigError,
    DatasetConfig,
    RunConfig,
    StrictModel,
    apply_overrides,
    describe_errors,
    set_path,
    validate_config,
)
from cvad.record import RECORD_METRICS, TrialRecord
from cvad.stream import section_key
from cvad.sweep.space import Grid, Node, SpaceError, covering, parse_space, sample, shuffled

MAX_FULL_VALIDATION = 10_000  # a space of more configurations is validated by its covering set, not point by point
MAX_UNBUDGETED_GRID = 10_000  # a larger grid runs only with a trial budget, on a seeded random sample of its points


class Objective(StrictModel):
    metric: str
    direction: Literal["maximize", "minimize"]

    @field_validator("metric")
    @classmethod
    def known_metric(cls, metric: str) -> str:
        if metric not in RECORD_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(RECORD_METRICS)}")
        return metric


class SamplerSettings(StrictModel):
    name: Literal["grid", "tpe", "nsga2", "random"] = "grid"
    seed: int = 0
    population_size: int = Field(8, ge=2, description="NSGA-II generation size")
    startup_trials: int = Field(5, ge=1, description="TPE: random trials before modelling")


class Resources(StrictModel):
    cpus_per_trial: float = Field(1, gt=0, description="CPUs Ray reserves per trial (also torch's thread count)")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs Ray reserves per trial; >0 runs trials with device cuda")
    max_concurrent: int | None = Field(None, ge=1, description="trials running at once (default: as many as fit)")


class Constraints(StrictModel):
    """Budgets passed to Optuna as constraints (<= 0 feasible), not filters after the fact."""

    max_mb: float | None = Field(None, gt=0)
    max_gflops: float | None = Field(None, gt=0)

    def limits(self) -> list[tuple[str, str, str, float]]:
        """(constraint, efficiency field, unit, limit) of each budget that is set."""
        budgets = [("max_mb", "memory_mb", "MB", self.max_mb), ("max_gflops", "gflops", "GFLOPs", self.max_gflops)]
        return [budget for budget in budgets if budget[-1] is not None]

    def values(self, eff: dict) -> dict[str, float]:
        """Optuna's constraint values (<= 0 feasible) by budget name, of an efficiency record (a trial's or a price)."""
        return {name: eff[field] - limit for name, field, _, limit in self.limits()}

    def violations(self, eff: dict) -> list[str]:
        """The budgets an efficiency record breaks, in words ("25.3 MB > max_mb 20"); empty when it fits."""
        return [
            f"{eff[field]:.3g} {unit} > {name} {limit:g}"
            for name, field, unit, limit in self.limits()
            if eff[field] > limit
        ]

    @property
    def active(self) -> bool:
        return self.max_mb is not None or self.max_gflops is not None


class SweepSettings(StrictModel):
    name: str = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study and MLflow experiment name"
    )
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    n_trials: int | None = Field(None, ge=1, description="trials to run (grid: default the whole grid)")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="pixel_f1", direction="maximize")], min_length=1
    )
    constraints: Constraints = Field(default_factory=Constraints)
    resources: Resources = Field(default_factory=Resources)
    feature_cache: bool = Field(
        True, description="share frozen networks' outputs per training image between trials ($CVAD_CACHE/features)"
    )
    detectors: Literal["front", "all", "none"] = Field(
        "front",
        description="which completed trials keep their fitted detector (detector.pt) as an MLflow artifact: "
        "front = the trials on the sweep's Pareto front at its end, all, or none; front keeps the stores small",
    )

    @field_validator("objectives", mode="before")
    @classmethod
    def parse_short_objectives(cls, items: Any) -> Any:
        """Accept ``maximize pixel_f1`` as well as ``{metric: pixel_f1, direction: maximize}``."""
        if not isinstance(items, list):
            return items
        parsed = []
        for item in items:
            if isinstance(item, str):
                direction, _, metric = item.partition(" ")
                parsed.append({"metric": metric.strip(), "direction": direction})
            else:
                parsed.append(item)
        return parsed

    @model_validator(mode="after")
    def trials_for_sampler(self) -> SweepSettings:
        if self.sampler.name != "grid" and self.n_trials is None:
            raise ValueError(
                f"sweep.n_trials is required for sampler '{self.sampler.name}' (only a grid has a natural end)"
            )
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"sweep.objectives names a metric twice: {metrics}")
        return self


# Dataset fields a trial reads its data with, not what the data is: sections differing only in these share one check.
READING_FIELDS = frozenset({"image_size", "batch_size", "eval_batch_size"})


def data_key(dataset: DatasetConfig) -> str:
    """What a dataset section's task stream depends on (its source and tasks, not the sizes it is read at), as text."""
    return json.dumps(dataset.model_dump(mode="json", exclude=set(READING_FIELDS)), sort_keys=True)


def describe_dataset(dataset: DatasetConfig | dict) -> str:
    """A dataset section (or a ``cvad.stream.section_key``, loaded) in words: ``'folder' at /data/x (tasks: all)``."""
    fields = dataset.model_dump(mode="json") if isinstance(dataset, DatasetConfig) else dataset
    tasks = fields["tasks"]
    where = f" at {fields['root']}" if fields.get("root") else ""
    return f"'{fields['name']}'{where} (tasks: {tasks if isinstance(tasks, str) else ', '.join(tasks)})"


@dataclass
class DataSection:
    """A distinct dataset section among the configurations the spec validated."""

    config: DatasetConfig
    point: dict  # the first space point that uses it
    points: int = 1  # how many of the validated points use it


class SweepSpec:
    """A validated sweep file: settings, the parsed space and the fixed run settings."""

    def __init__(self, raw: dict, source: str = "<sweep>") -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a sweep file is a mapping with 'sweep', 'space' and run-config sections")
        self.raw = copy.deepcopy(raw)
        self.source = source
        try:
            self.settings = SweepSettings.model_validate(raw.get("sweep") or {})
        except ValidationError as exc:
            lines = describe_errors(exc, SweepSettings, prefix="sweep")
            raise ConfigError(f"{source}: invalid sweep settings:\n  " + "\n  ".join(lines)) from None
        try:
            self.space: Node = parse_space(raw.get("space") or {})
        except SpaceError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        self.fixed = {k: v for k, v in raw.items() if k not in ("sweep", "space")}
        unknown = set(self.fixed) - set(RunConfig.model_fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown top-level key(s) {sorted(unknown)}; a sweep file holds 'sweep', 'space' "
                f"and run-config sections ({', '.join(RunConfig.model_fields)})"
            )
        self.grid_points: Grid | None = None
        self.datasets: dict[str, DataSection] = {}  # data_key -> section, filled by check_configs
        if self.settings.sampler.name == "grid":
            try:
                self.grid_points = Grid(self.space)
            except SpaceError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        self.check_configs()

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.settings.objectives]

    def config_for(self, trial, tasks: dict[str, list[str]] | None = None) -> RunConfig:
        """The run config of an Optuna trial (or ``optuna.trial.FixedTrial``).

        ``tasks`` (``cvad.stream.section_key`` -> category names) pins ``dataset.tasks`` to the concrete list the
        sweep resolved at its start, so that ``all`` means the same categories in every trial.
        """
        config = copy.deepcopy(self.fixed)
        sample(self.space, trial, config)
        run = validate_config(config)
        if tasks is None:
            return run
        pinned = tasks.get(section_key(run.dataset))
        if pinned is None:
            raise ConfigError(
                f"dataset {describe_dataset(run.dataset)} was not checked when the sweep started "
                "(no configuration validated then had this dataset section); "
                "list the datasets as choices of the space's dataset section"
            )
        if pinned == run.dataset.tasks:
            return run
        set_path(config, "dataset.tasks", list(pinned))
        return validate_config(config)

    def validation_points(self) -> Sequence[dict]:
        """What is validated before the sweep starts: every point (of the grid, or of the ranges' ends for the other
        samplers) when that is cheap; else a covering set, each branch and value once and every dataset section,
        since a million configurations validated one by one take a minute or more (a combination it misses fails
        as its trial, before running)."""
        points = self.grid_points if self.grid_points is not None else Grid(self.space, ends=True)
        if len(points) <= MAX_FULL_VALIDATION:
            return points
        return covering(self.space, joint="dataset", ends=self.grid_points is None)

    def check_configs(self, tasks: dict[str, list[str]] | None = None) -> None:
        """Validate the ``validation_points``; note their dataset sections.

        With ``tasks`` (see ``config_for``) the configurations are validated on the pinned task lists.
        """
        import optuna

        datasets: dict[str, DataSection] = {}
        for point in self.validation_points():
            try:
                config = self.config_for(optuna.trial.FixedTrial(point), tasks)
            except ConfigError as exc:
                chosen = ", ".join(f"{k}={v}" for k, v in point.items()) or "(no sampled parameters)"
                pinned = " (with dataset.tasks resolved to the dataset's categories)" if tasks is not None else ""
                raise ConfigError(
                    f"{self.source}: the space produces an invalid run config at {chosen}{pinned}:\n{exc}"
                ) from None
            key = data_key(config.dataset)
            if key in datasets:
                datasets[key].points += 1
            else:
                datasets[key] = DataSection(config.dataset, point)
        if tasks is None:
            self.datasets = datasets

    @property
    def needs_budget(self) -> bool:
        """A grid too large to run whole: it runs only with a trial budget, on a sample of its points."""
        return self.grid_points is not None and len(self.grid_points) > MAX_UNBUDGETED_GRID

    def n_trials(self, override: int | None = None) -> int:
        """Finished trials to reach: ``override`` (--max-trials), else sweep.n_trials, else the whole grid.

        A grid too large to run whole without a budget is refused (ConfigError), which the CLI asks before
        anything is created.
        """
        budget = override if override is not None else self.settings.n_trials
        if budget is not None:
            return budget
        if self.needs_budget:
            raise ConfigError(
                f"{self.source}: the grid has {len(self.grid_points):,} configurations, more than the "
                f"{MAX_UNBUDGETED_GRID:,} a sweep runs without a budget; pass --max-trials N (or set sweep.n_trials) "
                f"to run N of them, drawn at random (seed sweep.sampler.seed = {self.settings.sampler.seed})"
            )
        return len(self.grid_points)

    def run_order(self) -> Iterator[int]:
        """The grid's point indices in the order a sweep takes them: as listed when it may run whole, else a seeded
        random order (sweep.sampler.seed), so a budget spreads over the grid and --resume draws the same points."""
        if not self.needs_budget:
            return iter(range(len(self.grid_points)))
        return shuffled(len(self.grid_points), self.settings.sampler.seed)

    def stored_form(self) -> dict:
        """What identifies the sweep for --resume: everything but the trial count and which detectors are kept."""
        raw = copy.deepcopy(self.raw)
        raw.get("sweep", {}).pop("n_trials", None)
        raw.get("sweep", {}).pop("detectors", None)
        return raw


def objective_values(spec: SweepSpec, record: TrialRecord) -> list[float]:
    """The trial's objective values; raises ValueError if one is undefined or not finite."""
    values = []
    for objective in spec.settings.objectives:
        value = record.metric(objective.metric)
        if value is None or not math.isfinite(value):
            raise ValueError(
                f"objective {objective.metric} is {value} for this trial"
                + (" (undefined: the dataset has no masks or one class)" if value is None else "")
            )
        values.append(value)
    return values


def read_sweep_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping, on top of the file its ``extends:`` names (relative to it), if any."""
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself through {', '.join(map(str, seen))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with 'sweep', 'space' and run-config sections")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = read_sweep_file(path.parent / str(parent), (*seen, path.resolve()))
    if isinstance(base.get("sweep"), dict):  # a sweep's name is its own: two files must not share a study
        base["sweep"] = {k: v for k, v in base["sweep"].items() if k != "name"}
    return merge(base, raw)


def merge(base: dict, top: dict) -> dict:
    """Mappings merge key by key (a space mapping too); anything else (a value, a list of branches) is replaced."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep file (following ``extends``), apply ``--set`` overrides and validate."""
    path = Path(path)
    raw = apply_overrides(read_sweep_file(path), overrides or [])
    if isinstance(raw.get("sweep"), dict) or raw.get("sweep") is None:
        raw["sweep"] = {"name": path.stem, **(raw.get("sweep") or {})}  # the file's name unless it says otherwise
    return SweepSpec(raw, source=str(path))
