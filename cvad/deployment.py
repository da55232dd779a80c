"""From a trial to the device: find a trial's detector, record its export on the run, register it in MLflow.

The MLflow adapter of ``cvad export`` (``cvad.export`` itself knows nothing of MLflow). A
source is a ``cvad run`` output folder, a ``detector.pt`` file, or an MLflow run id whose
artifacts hold ``detector.pt`` (a sweep keeps those of its Pareto front by default).
What a registered model version carries as tags: the trial's final metrics, its budget
figures (``memory_mb``, ``gflops``, ``latency_ms``), the export's size, latency and
verification, and the dataset with its task list.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvad.detector import DETECTOR_FILE
from cvad.export import OUTPUT_NAMES, ExportReport
from cvad.tracking import log_metrics
from cvad.trial import RECORD_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
EXPORTS_EXPERIMENT = "cvad-exports"  # where a ``cvad run`` folder's export is registered (it has no run of its own)


class DeploymentError(ValueError):
    """A source that holds no detector, or a store that cannot take the export; the message says what to do."""


@dataclass
class ExportSource:
    """Where a detector came from: its file, its result record, and its MLflow run when it has one."""

    detector: Path
    record: dict | None
    run_id: str | None = None
    tracking_uri: str | None = None
    keep: tempfile.TemporaryDirectory | None = None  # downloaded artifacts live as long as the source

    def default_output(self, fmt: str) -> Path:
        name = f"detector.{'onnx' if fmt == 'onnx' else 'torchscript.pt'}"
        if self.run_id is not None:
            return Path("runs") / "exports" / self.run_id / name
        return self.detector.parent / name


def resolve_source(source: str, tracking_uri: str) -> ExportSource:
    """A folder, a detector file, or an MLflow run id (looked up at ``tracking_uri``)."""
    path = Path(source)
    if path.is_dir():
        return ExportSource(path / DETECTOR_FILE, read_record(path / RECORD_FILE))
    if path.is_file():
        return ExportSource(path, read_record(path.parent / RECORD_FILE))
    if not RUN_ID.match(source):
        raise DeploymentError(
            f"{source} is neither a folder, a file nor an MLflow run id (32 hex digits): give a `cvad run` output "
            "folder, a detector.pt, or a trial's run id (cvad recommend and the dashboard show them)"
        )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(source)
    except Exception as exc:
        raise DeploymentError(f"no MLflow run {source} at {tracking_uri} ({exc}); pass --tracking-uri") from None
    if run.data.tags.get("cvad.detector") != "stored":
        raise DeploymentError(
            f"run {source} kept no fitted detector: a sweep keeps only its Pareto front's by default "
            "(sweep.detectors: front); set sweep.detectors: all, or train this trial's config with `cvad run`, "
            "which keeps it, and export that folder"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files: no progress bars
    keep = tempfile.TemporaryDirectory(prefix="cvad-export-")
    detector = Path(client.download_artifacts(source, DETECTOR_FILE, keep.name))
    record = read_record(Path(client.download_artifacts(source, RECORD_FILE, keep.name)))
    return ExportSource(detector, record, source, tracking_uri, keep)


def read_record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def log_export(source: ExportSource, report: ExportReport) -> None:
    """Put the export's size, latency and verification on the trial's run, beside memory_mb, gflops, latency_ms."""
    if source.run_id is None:
        return
    from mlflow import MlflowClient

    log_metrics(MlflowClient(source.tracking_uri), source.run_id, report.metrics())


def version_tags(record: dict | None, report: ExportReport) -> dict[str, str]:
    """The registered version's tags: the trial's metrics, budget figures and data, and the export's own figures."""
    tags = {f"export.{key}": str(value) for key, value in report.metrics().items()}
    tags |= {"export.format": report.format, "export.input": report.input}
    if record is None:
        return tags
    tags |= {f"metric.{key}": str(value) for key, value in record["final"].items() if value is not None}
    efficiency = record["efficiency"]
    tags |= {f"budget.{key}": str(efficiency.get(key)) for key in ("memory_mb", "gflops", "latency_ms")}
    config = record["config"]
    tags |= {
        "dataset": config["dataset"]["name"],
        "tasks": "+".join(record["tasks"]),
        "model": config["model"]["name"],
        "backbone": config["backbone"]["name"],
        "strategy": config["strategy"]["name"],
    }
    return tags


def register_export(
    source: ExportSource, report: ExportReport, example: np.ndarray, name: str, tracking_uri: str
) -> str:
    """Log the exported file as a model of the trial's run (signature, input example) and register a new
    version under ``name``; returns the version. A folder source gets a run of its own in ``cvad-exports``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    uri = source.tracking_uri or tracking_uri
    for noisy in ("mlflow", "alembic"):  # store migrations and provider notes are not the user's concern here
        logging.getLogger(noisy).setLevel(logging.WARNING)
    client = MlflowClient(uri)
    size = example.shape[-1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, 3, size, size), "images")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1,), OUTPUT_NAMES[0]),
                TensorSpec(np.dtype(np.float32), (-1, size, size), OUTPUT_NAMES[1]),
            ]
        ),
    )
    run_id = source.run_id or new_run_for(client, source.record)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # log_model and register_model work on MLflow's global URI: set it for them only
    try:
        with mlflow.start_run(run_id=run_id):
            if report.format == "onnx":
                import onnx

                info = mlflow.onnx.log_model(
                    onnx.load(report.path), name="detector", signature=signature, input_example=example,
                    save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
                )  # fmt: skip
            else:
                import torch

                info = mlflow.pytorch.log_model(
                    torch.jit.load(report.path), name="detector", signature=signature, input_example=example
                )
        version = mlflow.register_model(info.model_uri, name, tags=version_tags(source.record, report))
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it again
    client.set_tag(run_id, "cvad.registered", f"{name}:{version.version}")
    return str(version.version)


def new_run_for(client, record: dict | None) -> str:
    """A run in ``cvad-exports`` for a ``cvad run`` folder, holding its record's final metrics and budget figures."""
    found = client.get_experiment_by_name(EXPORTS_EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPORTS_EXPERIMENT)
    run = client.create_run(experiment, tags={"cvad.role": "export"})
    if record is not None:
        budget = {key: record["efficiency"].get(key) for key in ("memory_mb", "gflops")}
        log_metrics(client, run.info.run_id, record["final"] | budget)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
