"""Registered detectors: an exported file logged as a model of its trial's run and registered as a version.

A version's tags say what it is without opening it: the trial's final metrics (``metric.*``), its
budget figures (``budget.memory_mb``, ``budget.gflops``, ``budget.latency_ms``), the export's own
figures (``export.*``), the dataset and its task list, the model, backbone and strategy.
"""

from __future__ import annotations

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
        "model": config["model"]["name"],
        "backbone": config["backbone"]["name"],
        "strategy": config["strategy"]["name"],
    }
    return tags


def signature_of(example: np.ndarray, output_names: tuple[str, str]):
    """uint8 (or float) ``[-1, 3, S, S]`` images in, image scores ``[-1]`` and anomaly maps ``[-1, S, S]`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = example.shape[-1]
    return ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, 3, size, size), "images")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1,), output_names[0]),
                TensorSpec(np.dtype(np.float32), (-1, size, size), output_names[1]),
            ]
        ),
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
    from cvad.export import OUTPUT_NAMES

    run_id = run_id or store.export_run(record)
    signature = signature_of(example, OUTPUT_NAMES)
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
