"""From a trial to the device: find a trial's detector, export and verify it, record the export, register it.

What ``cvad export`` and ``cvad recommend --register`` do (``cvad.export`` itself knows nothing of MLflow;
the tracking store does the MLflow side). A source is a ``cvad run`` output folder, a ``detector.pt``
file, or an MLflow run id whose artifacts hold ``detector.pt`` (a sweep keeps those of its Pareto front
by default).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cvad.detector import DETECTOR_FILE
from cvad.record import RECORD_FILE, TrialRecord
from cvad.tracking import Tag, TrackingStore

if TYPE_CHECKING:
    from cvad.export import ExportReport

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class DeploymentError(ValueError):
    """A source that holds no detector, or a store that cannot take the export; the message says what to do."""


@dataclass
class ExportSource:
    """Where a detector came from: its file, its result record, and its MLflow run when it has one."""

    detector: Path
    record: TrialRecord | None
    run_id: str | None = None
    keep: tempfile.TemporaryDirectory | None = None  # downloaded artifacts live as long as the source

    @property
    def origin(self) -> str:
        """Where the detector file came from, in words (a refusal of a file that is not what it claims names it)."""
        return f"the artifacts of MLflow run {self.run_id}" if self.run_id else f"the folder {self.detector.parent}"

    def default_output(self, fmt: str, precision: str = "fp32") -> Path:
        """detector.onnx, or detector.int8.onnx at another precision, so that it stands beside the fp32 file."""
        tag = "" if precision == "fp32" else f"{precision}."
        name = f"detector.{tag}{'onnx' if fmt == 'onnx' else 'torchscript.pt'}"
        if self.run_id is not None:
            return Path("runs") / "exports" / self.run_id / name
        return self.detector.parent / name


def names_a_run(source: str) -> bool:
    """Whether a source is an MLflow run id (and no file or folder of that name): it needs the tracking store."""
    return bool(RUN_ID.match(source)) and not Path(source).exists()


def record_beside(path: Path) -> TrialRecord | None:
    return TrialRecord.read(path) if path.is_file() else None


def resolve_source(source: str, store: TrackingStore | None) -> ExportSource:
    """A folder, a detector file, or an MLflow run id (looked up in ``store``)."""
    path = Path(source)
    if path.is_dir():
        return ExportSource(path / DETECTOR_FILE, record_beside(path / RECORD_FILE))
    if path.is_file():
        return ExportSource(path, record_beside(path.parent / RECORD_FILE))
    if not RUN_ID.match(source) or store is None:
        raise DeploymentError(
            f"{source} is neither a folder, a file nor an MLflow run id (32 hex digits): give a `cvad run` output "
            "folder, a detector.pt, or a trial's run id (cvad recommend and the dashboard show them)"
        )
    try:
        tags = store.run_tags(source)
    except Exception as exc:
        raise DeploymentError(f"no MLflow run {source} at {store.uri} ({exc}); pass --tracking-uri") from None
    if tags.get(Tag.DETECTOR) != "stored":
        raise DeploymentError(
            f"run {source} kept no fitted detector: a sweep keeps only its Pareto front's by default "
            "(sweep.detectors: front); set sweep.detectors: all, or train this trial's config with `cvad run`, "
            "which keeps it, and export that folder"
        )
    keep = tempfile.TemporaryDirectory(prefix="cvad-export-")
    detector = store.download(source, DETECTOR_FILE, keep.name)
    return ExportSource(detector, store.record(source), source, keep)


@dataclass
class Deployment:
    """An export done: where it came from, what it measured, and its registry version if it was registered."""

    source: ExportSource
    report: ExportReport
    version: str | None = None


def deploy(
    source: str,
    file_format: str,
    out: Path | None,
    input_kind: str,
    register: str | None,
    tracking_uri: str,
    say=print,
    precision: str = "fp32",
    max_drop: float | None = None,
) -> Deployment:
    """Export a source's detector at ``precision``, verify it (fp16/int8: no task's image ROC-AUC down by more than
    ``max_drop``, default ``cvad.export.MAX_DROP``), write its report beside it, log it on its run, register it."""
    from cvad.detector import load_detector
    from cvad.export import MAX_DROP, check_export_options, export_detector, learned_splits, verification_images
    from cvad.tracking.registry import register_export

    max_drop = MAX_DROP if max_drop is None else max_drop
    check_export_options(file_format, precision, max_drop)
    store = TrackingStore(tracking_uri) if names_a_run(source) or register else None
    found = resolve_source(source, store)
    detector = load_detector(found.detector, found.origin)
    say(f"cvad export: {found.detector} ({detector.model.name}, tasks {', '.join(detector.tasks)})")
    out = out or found.default_output(file_format, precision)
    if precision == "fp32":
        images = verification_images(detector)
        report = export_detector(detector, file_format, out, images, input_kind)
    else:
        from cvad.export_precision import calibration_images, export_reduced, task_test_sets

        splits, size = learned_splits(detector), detector.config.dataset.image_size
        test_sets = task_test_sets(splits, size)
        images = test_sets[0].images
        report = export_reduced(
            detector, out, precision, test_sets, calibration_images(splits, size), input_kind, max_drop
        )
    if found.run_id is not None and store is not None:  # beside memory_mb, gflops and latency_ms on the run
        store.log_metrics(found.run_id, report.metrics())
    Path(f"{report.path}.json").write_text(json.dumps(report.as_dict(), indent=1))
    deployment = Deployment(found, report)
    if register:
        example = images[:1].numpy() if input_kind == "uint8" else images[:1].float().numpy() / 255
        deployment.version = register_export(store, found.run_id, found.record, report, example, register)
    return deployment
