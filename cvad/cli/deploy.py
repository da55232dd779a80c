"""``cvad export``: a fitted detector as one verified file for the device (``cvad.deployment``)."""

from __future__ import annotations

from pathlib import Path

import typer

from cvad.cli.common import cli, fail, fmt
from cvad.tracking import DEFAULT_STORE, resolve_tracking_uri


@cli.command("export")
def export_command(
    source: str = typer.Argument(..., help="a `cvad run` folder, a detector.pt, or a trial's MLflow run id"),
    file_format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="file to write (default: beside the detector, or runs/exports/RUN_ID/)"
    ),
    input_kind: str = typer.Option("uint8", "--input", help="what the file takes: uint8 (0-255) or float (0-1) images"),
    register: str | None = typer.Option(
        None, "--register", help="also log the export as a model of the run and register a version under this name"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    ),
    store: Path = typer.Option(DEFAULT_STORE, "--store", help="folder of the local MLflow store"),
) -> None:
    """Export a fitted detector to one file for the device, verified against PyTorch on the run's test images.

    The file takes an image batch [B, 3, S, S] and returns image scores [B] and anomaly maps [B, S, S]: the
    whole path (backbone, heads, scoring, task routing). Example: cvad export runs/quickstart-... --format onnx
    """
    if file_format not in ("onnx", "torchscript"):
        fail(f"--format {file_format!r}: choose onnx or torchscript")
    if input_kind not in ("uint8", "float"):
        fail(f"--input {input_kind!r}: choose uint8 or float")
    uri = resolve_tracking_uri(tracking_uri, store)
    export_and_register(source, file_format, out, input_kind, register, uri)


def export_and_register(
    source: str, file_format: str, out: Path | None, input_kind: str, register: str | None, uri: str
) -> None:
    """What ``cvad export`` and ``cvad recommend --register`` do for one detector (``cvad.deployment.deploy``)."""
    from cvad.data import DatasetError
    from cvad.deployment import DeploymentError, deploy
    from cvad.detector import DetectorError
    from cvad.export import ExportError
    from cvad.record import RecordError
    from cvad.tracking import TrackingError

    try:
        done = deploy(source, file_format, out, input_kind, register, uri, say=typer.echo)
    except (DeploymentError, DetectorError, ExportError, DatasetError, RecordError, TrackingError) as exc:
        fail(str(exc))
    print_export(done.report, done.source.record)
    if done.version is not None:
        typer.echo(f"registered {register} version {done.version} at {uri}")


def print_export(report, record) -> None:
    """The export beside the trial's own figures (its ``TrialRecord``, if any): size, stored tensors, verification,
    latency."""
    weights = ", ".join(f"{dtype} {n / 2**20:.3g} MB" for dtype, n in report.weights_bytes_by_dtype.items())
    eff = record.efficiency if record else {}
    lines = [
        f"wrote {report.path} ({report.format}, input {report.input})",
        f"  file        {report.file_mb:8.3f} MB  (stored tensors: {weights})",
        f"  verified on {report.images_checked} test images: max |diff| scores {report.max_abs_diff_scores:.2g} "
        f"(tolerance {report.tolerance_scores:.2g}), maps {report.max_abs_diff_maps:.2g} "
        f"(tolerance {report.tolerance_maps:.2g})",
        f"  latency     {report.latency_ms:8.2f} ms at batch 1 ({report.threads} threads; PyTorch here: "
        f"{report.pytorch_latency_ms:.2f} ms)",
        f"  outputs     {', '.join(report.outputs)}"
        + ("" if report.decides else " (no thresholds: the run was fit with calibration.holdout 0)"),
    ]
    if eff:
        lines.append(
            f"  the trial:  memory_mb {fmt(eff.get('memory_mb'))} MB, gflops {fmt(eff.get('gflops'))}, "
            f"latency_ms {fmt(eff.get('latency_ms'))} ({eff.get('latency_device', '?')})"
        )
    typer.echo("\n".join(lines))
