"""Registered detectors: an exported file logged as a model of its trial's run and registered as a version.

A version's tags say what it is without opening it: the trial's final metrics (``metric.*``), its
budget figures (``budget.memory_mb``, ``budget.gflops``, ``budget.latency_ms``), the export's own
figures (``export.*``), the dataset and its task list, the model, backbone and strategy; and for
the line that keeps learning (one version per ``cvad learn --register``): the task it added
(``learned``), the last matrix row per metric (``row.<metric>``, JSON task -> value), each step's
thresholds (``thresholds.image``, ``thresholds.pixel``, JSON lists) and what the last update cost
(``update.seconds``, ``update.peak_mb``, ``update.state_mb``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cvad.record import TrialRecord
from cvad.tracking.store import TrackingStore
from cvad.tracking.tags import Tag

if TYPE_CHECKING:
    from cvad.export import ExportReport

MODEL_ARTIFACT = "detector"  # where the exported model lies in its run's artifacts
ROW_METRICS = ("image_f1", "pixel_f1", "pixel_aupro", "image_f1_calibrated", "image_fpr", "pixel_f1_calibrated")


def version_tags(record: TrialRecord | None, report: ExportReport) -> dict[str, str]:
    """The registered version's tags: the trial's metrics, budget figures and data, and the export's own figures."""
    tags = {f"export.{key}": str(value) for key, value in report.metrics().items()}
    tags |= {"export.format": report.format, "export.input": report.input}
    if record is None:
        return tags
    tags |= {f"metric.{key}": str(value) for key, value in record.final.items() if value is not None}
    tags |= {f"budget.{key}": str(record.efficiency.get(key)) for key in ("memory_mb", "gflops", "latency_ms")}
    config = record.config
    tags |= {
        "dataset": config["dataset"]["name"],
        "tasks": "+".join(record.tasks),
        "task_count": str(len(record.tasks)),
        "learned": record.tasks[-1],
        "model": config["model"]["name"],
        "backbone": config["backbone"]["name"],
        "strategy": config["strategy"]["name"],
    }
    last = len(record.tasks) - 1
    for metric in ROW_METRICS:
        if metric in record.matrices:
            tags[f"row.{metric}"] = json.dumps(dict(zip(record.tasks, record.matrices[metric][last])))
    if record.thresholds:
        tags |= {f"thresholds.{kind}": json.dumps(record.thresholds[kind]) for kind in ("image", "pixel")}
    if record.steps:
        step = record.steps[-1]
        update = {"seconds": step.train_seconds, "peak_mb": step.update_peak_mb, "state_mb": step.update_state_mb}
        tags |= {f"update.{key}": str(value) for key, value in update.items() if value is not None}
    return tags


def signature_of(example: np.ndarray, decides: bool):
    """uint8 (or float) ``[-1, 3, S, S]`` images in, image scores ``[-1]`` and anomaly maps ``[-1, S, S]`` out, and
    for a detector with thresholds the decisions (bool, same shapes)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from cvad.export import DECISION_NAMES, OUTPUT_NAMES

    size = example.shape[-1]
    outputs = [
        TensorSpec(np.dtype(np.float32), (-1,), OUTPUT_NAMES[0]),
        TensorSpec(np.dtype(np.float32), (-1, size, size), OUTPUT_NAMES[1]),
    ]
    if decides:
        outputs += [
            TensorSpec(np.dtype(np.bool_), (-1,), DECISION_NAMES[0]),
            TensorSpec(np.dtype(np.bool_), (-1, size, size), DECISION_NAMES[1]),
        ]
    return ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, 3, size, size), "images")]), outputs=Schema(outputs)
    )


def register_export(
    store: TrackingStore,
    run_id: str | None,
    record: TrialRecord | None,
    report: ExportReport,
    example: np.ndarray,
    name: str,
) -> str:
    """Log the exported file as a model of the trial's run (signature, input example) and register a new
    version under ``name``; returns the version. Without a run (a ``cvad run`` folder) it gets one in
    ``cvad-exports``. MLflow's global tracking URI is never touched: the model is saved here and uploaded
    to the run through the store's client."""
    run_id = run_id or store.export_run(record)
    signature = signature_of(example, report.decides)
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / MODEL_ARTIFACT
        if report.format == "onnx":
            import mlflow.onnx
            import onnx

            mlflow.onnx.save_model(
                onnx.load(report.path), str(saved), signature=signature, input_example=example,
                save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            )  # fmt: skip
        else:
            import mlflow.pytorch
            import torch

            mlflow.pytorch.save_model(
                torch.jit.load(report.path), str(saved), signature=signature, input_example=example
            )
        store.client.log_artifacts(run_id, str(saved), MODEL_ARTIFACT)
    source = f"{store.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    if not store.client.search_registered_models(f"name = '{name}'"):
        store.client.create_registered_model(name)
    version = store.client.create_model_version(name, source, run_id=run_id, tags=version_tags(record, report))
    store.client.set_tag(run_id, Tag.REGISTERED, f"{name}:{version.version}")
    return str(version.version)
