"""A trial's result record: the one type every writer and reader of ``result.json`` uses.

``run_trial`` returns a :class:`TrialRecord`; ``cvad run`` writes it as ``result.json``, the sweep
logs it to MLflow (``cvad.tracking``), selection and deployment read it back. Reading converts
older schemas to the current one, so no reader sees another layout. Fields are described in
README.md ("The result record"); ``RESULT_SCHEMA`` versions them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cvad.files import write_atomic
from cvad.metrics import DETECTION_METRICS, FORGETTING_METRICS

RECORD_FILE = "result.json"
RESULT_SCHEMA = 2  # 2: MB = 2^20 bytes and GFLOPs = 2 x GMACs, raw counts kept (1: MB = 10^6 bytes, GFLOPs = GMACs)
SCHEMA_1_MB = 1e6 / 2**20  # a schema-1 MB in the paper's MB (2^20 bytes)

# What an objective, a constraint or a ranking may name: where it lives in the record.
RECORD_METRICS = {
    **{metric: ("final", metric) for metric in (*DETECTION_METRICS, *FORGETTING_METRICS)},
    **{metric: ("efficiency", metric) for metric in ("memory_mb", "gflops", "latency_ms")},
    **{metric: ("efficiency", metric) for metric in ("update_seconds", "update_peak_mb")},
}


class RecordError(ValueError):
    """A file that is not a readable result record; the message says which and why."""


class RecordWriteError(OSError):
    """The result record could not be written where asked; the message says where it was saved instead."""


def paper_units(schema: int | None, memory_mb: float | None, gflops: float | None) -> tuple[float | None, ...]:
    """(memory_mb, gflops, gmacs) in the paper's units from figures logged under ``schema``."""
    if schema == 1 and memory_mb is not None:
        return memory_mb * SCHEMA_1_MB, None if gflops is None else 2 * gflops, gflops
    return memory_mb, gflops, None if gflops is None else gflops / 2


@dataclass(frozen=True)
class StepRecord:
    """One training step of the stream: what it trained on ("a+b" for a joint step) and what it took."""

    step: int
    trained_on: str
    train_images: int
    train_seconds: float
    eval_seconds: float
    replay_per_task: list[int] | None = None  # images the replay buffer holds of each task seen
    held_out_images: int = 0  # good training images kept out of training to calibrate the step's thresholds
    update_peak_mb: float | None = None  # the process's peak resident-set rise during the update (measured)
    update_state_mb: float | None = None  # stored state + replay buffer + the step's images (from tensors)
    data_root: str | None = None  # where the task's images were, when not in the config's dataset.root (cvad learn)

    def with_eval_seconds(self, seconds: float) -> StepRecord:
        return replace(self, eval_seconds=seconds)


@dataclass(frozen=True)
class DetectorFile:
    """The fitted detector's file beside the record (``cvad.detector``)."""

    file: str
    bytes: int
    mb: float


@dataclass(frozen=True)
class TrialRecord:
    """What a trial measured: the config, the T x T matrices, the final averages, the efficiency, the timings."""

    config: dict  # the validated config with every default filled in
    tasks: list[str]
    matrices: dict[str, list[list[float | None]]]  # metric -> [step][task]
    final: dict[str, float | None]
    efficiency: dict[str, Any]
    weights: dict[str, Any]
    steps: tuple[StepRecord, ...]
    wall_seconds: dict[str, float]
    seed: int
    cvad_version: str
    schema: int = RESULT_SCHEMA
    detector: DetectorFile | None = None
    warnings: tuple[str, ...] = ()
    # Calibration (docs/methods.md section 8): each step's deployed thresholds, the targets, and per
    # metric of THRESHOLD_MATRICES the T x T matrix of what each task's held-out images give after each step.
    thresholds: dict[str, Any] | None = None

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> TrialRecord:
        """A record from its JSON form, any schema; older schemas come out in the current units."""
        data = dict(content)
        schema = int(data.get("schema", 1))
        efficiency = dict(data["efficiency"])
        if schema == 1:
            mb, gflops, gmacs = paper_units(1, efficiency.get("memory_mb"), efficiency.get("gflops"))
            efficiency.update(memory_mb=mb, gflops=gflops, gmacs=gmacs)
            if "memory_breakdown_mb" in efficiency:
                efficiency["memory_breakdown_mb"] = {
                    k: v * SCHEMA_1_MB for k, v in efficiency["memory_breakdown_mb"].items()
                }
        detector = data.get("detector")
        return cls(
            config=data["config"],
            tasks=list(data["tasks"]),
            matrices=data["matrices"],
            final=data["final"],
            efficiency=efficiency,
            weights=data.get("weights", {}),
            steps=tuple(StepRecord(**step) for step in data.get("steps", [])),
            wall_seconds=data.get("wall_seconds", {}),
            seed=int(data.get("seed", data["config"].get("seed", 0))),
            cvad_version=str(data.get("cvad_version", "")),
            schema=RESULT_SCHEMA,
            detector=DetectorFile(**detector) if detector else None,
            warnings=tuple(data.get("warnings", ())),
            thresholds=data.get("thresholds"),
        )

    @classmethod
    def read(cls, path: Path) -> TrialRecord:
        """The record in ``path`` (a ``result.json``)."""
        try:
            return cls.from_text(Path(path).read_text())
        except FileNotFoundError:
            raise RecordError(f"no result record at {path}") from None
        except RecordError as exc:
            raise RecordError(f"{path}: {exc}") from None

    @classmethod
    def from_text(cls, text: str) -> TrialRecord:
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordError(f"not a cvad result record ({type(exc).__name__}: {exc})") from None

    # -- what it says ------------------------------------------------------------------------
    def metric(self, name: str) -> float | None:
        """A metric an objective or a ranking names (``RECORD_METRICS``): None where undefined."""
        section, key = RECORD_METRICS[name]
        value = getattr(self, section).get(key)
        return None if value is None else float(value)

    @property
    def pretrained(self) -> bool:
        return bool(self.weights.get("pretrained"))

    def row(self, step: int) -> dict[str, list[float | None]]:
        """Every metric's row after ``step``."""
        return {metric: matrix[step] for metric, matrix in self.matrices.items()}

    def final_metrics(self) -> dict[str, float]:
        """The figures a tracking store keeps as the trial's final metrics (None left out)."""
        eff, wall = self.efficiency, self.wall_seconds
        values: dict[str, Any] = {k: self.final.get(k) for k in FORGETTING_METRICS}
        values |= {k: eff.get(k) for k in ("memory_mb", "memory_bytes", "gflops", "gmacs", "latency_ms")}
        values |= {k: eff.get(k) for k in ("update_seconds", "update_peak_mb", "update_state_mb")}
        if eff.get("latency_ms") is not None:  # a spread that says the machine was busy is kept beside the figure
            values |= {"latency_iqr_ms": eff["latency_iqr_ms"], "latency_noisy": float(eff["latency_noisy"])}
        values |= {f"memory_mb.{part}": mb for part, mb in eff.get("memory_breakdown_mb", {}).items()}
        if self.detector is not None:  # the fitted detector's file size, beside the memory it was priced at
            values["detector_mb"] = self.detector.mb
        values |= {
            "train_seconds": wall.get("train"),
            "eval_seconds": wall.get("eval"),
            "wall_seconds": wall.get("total"),
        }
        return {k: float(v) for k, v in values.items() if v is not None}

    def matrix_csv(self, metric: str) -> str:
        """One matrix (a metric's, or a threshold matrix) as CSV: a row per step, a column per task, empty where
        undefined."""
        matrix = self.matrices[metric] if metric in self.matrices else self.thresholds["matrices"][metric]
        lines = ["after_step," + ",".join(self.tasks)]
        for name, row in zip(self.tasks, matrix):
            lines.append(name + "," + ",".join("" if v is None else f"{v:.6f}" for v in row))
        return "\n".join(lines) + "\n"

    # -- changing and writing ----------------------------------------------------------------
    def with_detector(self, detector: DetectorFile | None) -> TrialRecord:
        return replace(self, detector=detector)

    def with_warning(self, warning: str) -> TrialRecord:
        return replace(self, warnings=(*self.warnings, warning))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (README's field table); ``detector`` only when there is one."""
        content = asdict(self)
        content["steps"] = [asdict(s) for s in self.steps]
        content["warnings"] = list(self.warnings)
        if self.detector is None:
            del content["detector"]
        return content

    def to_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: Path) -> None:
        """Write the record to ``path`` atomically; if that fails (disk full, read-only), save it elsewhere and say
        where (``RecordWriteError``)."""
        text = self.to_text()
        try:
            write_atomic(path, text)
        except OSError as exc:
            stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            fallback = Path(tempfile.gettempdir()) / f"cvad-result-{stamp}.json"
            try:
                fallback.write_text(text)
            except OSError:
                raise RecordWriteError(
                    f"could not write the result record to {path} ({exc}), nor to {fallback}"
                ) from exc
            raise RecordWriteError(
                f"could not write the result record to {path} ({exc}); it was saved to {fallback}: move it there "
                "once there is room"
            ) from exc
