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
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32; fp16 (weights stored as float16, computed in float32); int8 (the backbone quantized, calibrated "
        "on the training images). fp16 and int8: onnx only, checked on each task's accuracy",
    ),
    max_drop: float = typer.Option(
        0.01,
        "--max-drop",
        help="fp16/int8: the largest image ROC-AUC drop per task, from the fp32 PyTorch model's, to accept; more in "
        "any task refuses the export",
    ),
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
    whole path (backbone, heads, scoring, task routing). Example: cvad export runs/quickstart-... --format onnx.
    At --precision fp16 or int8 (ONNX) it is checked instead on every test image of each task: image and pixel
    ROC-AUC and F1 against the fp32 PyTorch model's, and its size and latency against the fp32 file's.
    """
    if file_format not in ("onnx", "torchscript"):
        fail(f"--format {file_format!r}: choose onnx or torchscript")
    if input_kind not in ("uint8", "float"):
        fail(f"--input {input_kind!r}: choose uint8 or float")
    if precision not in ("fp32", "fp16", "int8"):
        fail(f"--precision {precision!r}: choose fp32, fp16 or int8")
    if precision != "fp32" and file_format != "onnx":
        fail(f"--precision {precision}: a {file_format} export is fp32 only; give --format onnx for fp16 or int8")
    if not max_drop >= 0:  # NaN too
        fail(f"--max-drop {max_drop}: give the largest image ROC-AUC drop per task to accept, 0 or more (e.g. 0.01)")
    uri = resolve_tracking_uri(tracking_uri, store)
    export_and_register(source, file_format, out, input_kind, register, uri, precision, max_drop)


def export_and_register(
    source: str,
    file_format: str,
    out: Path | None,
    input_kind: str,
    register: str | None,
    uri: str,
    precision: str = "fp32",
    max_drop: float | None = None,
) -> None:
    """What ``cvad export`` and ``cvad recommend --register`` do for one detector (``cvad.deployment.deploy``)."""
    from cvad.data import DatasetError
    from cvad.deployment import DeploymentError, deploy
    from cvad.detector import DetectorError
    from cvad.export import ExportError
    from cvad.record import RecordError
    from cvad.tracking import TrackingError

    try:
        done = deploy(source, file_format, out, input_kind, register, uri, typer.echo, precision, max_drop)
    except (DeploymentError, DetectorError, ExportError, DatasetError, RecordError, TrackingError) as exc:
        fail(str(exc))
    print_export(done.report, done.source.record)
    if done.version is not None:
        typer.echo(f"registered {register} version {done.version} at {uri}")


def print_export(report, record) -> None:
    """The export beside the trial's own figures (its ``TrialRecord``, if any): size, stored tensors, verification
    (at fp16/int8: each task's accuracy), latency."""
    weights = ", ".join(f"{dtype} {n / 2**20:.3g} MB" for dtype, n in report.weights_bytes_by_dtype.items())
    eff = record.efficiency if record else {}
    lines = [f"wrote {report.path} ({report.format} {report.precision}, input {report.input})"]
    lines += (reduced_lines if report.accuracy else fp32_lines)(report, weights)
    lines.append(
        f"  outputs     {', '.join(report.outputs)}"
        + ("" if report.decides else " (no thresholds: the run was fit with calibration.holdout 0)")
    )
    if eff:
        lines.append(
            f"  the trial:  memory_mb {fmt(eff.get('memory_mb'))} MB, gflops {fmt(eff.get('gflops'))}, "
            f"latency_ms {fmt(eff.get('latency_ms'))} ({eff.get('latency_device', '?')})"
        )
    typer.echo("\n".join(lines))


def fp32_lines(report, weights: str) -> list[str]:
    """An fp32 export: its size, its elementwise agreement with PyTorch, its latency."""
    return [
        f"  file        {report.file_mb:8.3f} MB  (stored tensors: {weights})",
        f"  verified on {report.images_checked} test images: max |diff| scores {report.max_abs_diff_scores:.2g} "
        f"(tolerance {report.tolerance_scores:.2g}), maps {report.max_abs_diff_maps:.2g} "
        f"(tolerance {report.tolerance_maps:.2g})",
        f"  latency     {report.latency_ms:8.2f} ms at batch 1 ({report.threads} threads; PyTorch here: "
        f"{report.pytorch_latency_ms:.2f} ms)",
    ]


def reduced_lines(report, weights: str) -> list[str]:
    """An fp16/int8 export: size and latency against the fp32 file's, and each task's accuracy against PyTorch's."""
    how = {
        "fp16": "weights stored as float16, computed in float32",
        "int8": f"{report.quantized_nodes} backbone nodes run as int8 kernels (convolutions, matrix products, residual "
        f"adds), activation ranges from {report.calibration_images} training images; scoring in float32",
    }[report.precision]
    lines = [
        f"  {report.precision}        {how}",
        f"  file        {report.file_mb:8.3f} MB  ({report.size_vs_fp32:.2f} x the fp32 file's "
        f"{report.fp32_file_bytes / 2**20:.3f} MB; stored tensors: {weights})",
        f"  latency     {report.latency_ms:8.2f} ms at batch 1 (speed-up {report.speedup_vs_fp32:.2f} x over the fp32 "
        f"file's {report.fp32_latency_ms:.2f} ms; {report.threads} threads; PyTorch here: "
        f"{report.pytorch_latency_ms:.2f} ms)",
        f"  checked on all {report.images_checked} test images, each task against the fp32 PyTorch model "
        f"(refused if an image ROC-AUC drops by more than {report.max_drop:g}):",
        f"    {'task':<16} {'images':>6}  {'image ROC-AUC':>21}  {'image F1':>21}  {'pixel ROC-AUC':>21}  "
        f"{'pixel F1':>21}",
        f"    {'':<16} {'':>6}  " + "  ".join(f"{'torch  file   drop':>21}" for _ in range(4)),
    ]
    for task in report.accuracy:
        cells = "  ".join(
            f"{fmt(task.pytorch[m])} {fmt(task.exported[m])} {fmt(task.drop[m], 3):>6}".rjust(21)
            for m in ("image_auroc", "image_f1", "pixel_auroc", "pixel_f1")
        )
        lines.append(f"    {task.task:<16} {task.images:>6}  {cells}")
    decided = (
        "" if report.decisions_differ is None
        else f"; decisions (is_defect) differing from PyTorch's: {report.decisions_differ} images"
    )  # fmt: skip
    lines.append(
        f"  max |diff| scores {report.max_abs_diff_scores:.2g}, maps {report.max_abs_diff_maps:.2g} "
        f"(information: no elementwise tolerance at {report.precision}){decided}"
    )
    return lines
