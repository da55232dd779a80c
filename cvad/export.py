"""A fitted detector as one self-contained file for the device: ONNX or TorchScript, verified before it is written.

The exported graph is the whole deployed path (``AnomalyModel.forward``: backbone, heads,
scoring, task routing) behind an input step: a uint8 (0-255) or float (0-1) image batch
``[B, 3, S, S]`` in, ``image_scores [B]`` and ``anomaly_maps [B, S, S]`` out, and for a detector
with calibrated thresholds the decision too (``cvad.decision``): ``is_defect [B]`` and
``defect_masks [B, S, S]``, bool; the batch size is free. Before the file is moved into place, it
runs on the run's own test images in its own runtime (ONNX Runtime, or the loaded TorchScript
module) and its outputs are compared with PyTorch's; a score over the tolerance, or a decision that
differs where PyTorch's score is not within that tolerance of its threshold, fails the export and
writes nothing. That is the fp32 export; ONNX files at fp16 or int8 (``cvad.export_precision``) are judged by
each task's accuracy instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch
from torch import nn

from cvad.catalog import config_name
from cvad.decision import DecisionRule
from cvad.detector import Detector
from cvad.efficiency import time_calls
from cvad.models.base import AnomalyOutput

if TYPE_CHECKING:
    from cvad.data.base import CategorySplit
    from cvad.export_precision import TaskAccuracy

Format = Literal["onnx", "torchscript"]
InputKind = Literal["uint8", "float"]
Precision = Literal["fp32", "fp16", "int8"]
FORMATS: tuple[str, ...] = get_args(Format)
PRECISIONS: tuple[str, ...] = get_args(Precision)
MAX_DROP = 0.01  # fp16/int8: the largest image ROC-AUC drop per task, from the fp32 PyTorch model's, accepted
OUTPUT_NAMES = ("image_scores", "anomaly_maps")
DECISION_NAMES = ("is_defect", "defect_masks")  # a detector with thresholds also returns these
RELATIVE_TOLERANCE = 1e-3  # of the largest |value| PyTorch gives on the checked images, per output
VERIFY_BATCH = 4  # images per verification call: a batch size other than the example's 2, so a baked-in size fails


class ExportError(RuntimeError):
    """A detector that could not be exported or whose export does not match PyTorch; the message says which."""


class DeployedDetector(nn.Module):
    """What the device runs: an image batch in its camera's type -> image scores, anomaly maps and, with a
    decision rule, whether each image is defective and its defect mask."""

    def __init__(self, model: nn.Module, input_kind: InputKind, rule: DecisionRule | None = None) -> None:
        super().__init__()
        self.model = model
        self.input_kind = input_kind
        self.rule = rule

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (DECISION_NAMES if self.rule is not None else ())

    def scored(self, images: torch.Tensor) -> AnomalyOutput:
        return self.model(images.float().div(255.0) if self.input_kind == "uint8" else images)

    def outputs(self, out: AnomalyOutput) -> tuple[torch.Tensor, ...]:
        if self.rule is None:
            return out.image_scores, out.anomaly_maps
        return (out.image_scores, out.anomaly_maps, *self.rule(out))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.outputs(self.scored(images))


@dataclass
class ExportReport:
    """What an export produced and how it compares with PyTorch and with the run's own figures."""

    format: str
    path: str
    input: str  # e.g. "uint8 [B, 3, 224, 224]"
    file_bytes: int
    file_mb: float  # 2^20 bytes
    weights_bytes: int  # the tensors stored in the file (ONNX initializers / TorchScript parameters and buffers)
    weights_bytes_by_dtype: dict[str, int]
    images_checked: int
    max_abs_diff_scores: float
    max_abs_diff_maps: float
    tolerance_scores: float | None  # None at fp16/int8: the accuracy check replaces the elementwise one
    tolerance_maps: float | None
    latency_ms: float  # the exported file in its runtime, batch 1, median
    latency_iqr_ms: float
    pytorch_latency_ms: float  # the PyTorch model, same images, same machine, same threads
    threads: int
    outputs: tuple[str, ...] = OUTPUT_NAMES  # with DECISION_NAMES when the detector has calibrated thresholds
    precision: str = "fp32"  # fp16: float16 weights computed in float32; int8: the backbone quantized
    # fp16/int8 only (``cvad.export_precision``): the accuracy check, and the fp32 ONNX file it stands beside.
    max_drop: float | None = None
    accuracy: list[TaskAccuracy] = field(default_factory=list)  # per task, on all its test images
    decisions_differ: int | None = None  # test images the file decides otherwise than PyTorch (with thresholds)
    quantized_nodes: int | None = None  # int8: backbone nodes run as int8 kernels (convolutions, matrix products, adds)
    calibration_images: int | None = None  # int8: training images the activation ranges were calibrated on
    fp32_file_bytes: int | None = None
    fp32_latency_ms: float | None = None  # batch 1, median, timed beside latency_ms

    @property
    def decides(self) -> bool:
        return DECISION_NAMES[0] in self.outputs

    @property
    def size_vs_fp32(self) -> float | None:
        return self.file_bytes / self.fp32_file_bytes if self.fp32_file_bytes else None

    @property
    def speedup_vs_fp32(self) -> float | None:
        return self.fp32_latency_ms / self.latency_ms if self.fp32_latency_ms else None

    def worst_drop(self, metric: str) -> float | None:
        """The largest drop of ``metric`` over the tasks (None without an accuracy check or where undefined)."""
        drops = [task.drop[metric] for task in self.accuracy if task.drop[metric] is not None]
        return max(drops, default=None)

    def as_dict(self) -> dict:
        return asdict(self) | {"size_vs_fp32": self.size_vs_fp32, "speedup_vs_fp32": self.speedup_vs_fp32}

    def metrics(self) -> dict[str, float]:
        """What is logged on the trial's MLflow run, beside memory_mb, gflops and latency_ms; keyed by format and
        precision (fp32 keeps the bare format), so that one run's exports at several precisions stand side by side."""
        prefix = f"export_{self.format}" + ("" if self.precision == "fp32" else f"_{self.precision}")
        figures = {
            "mb": self.file_mb,
            "latency_ms": self.latency_ms,
            "max_abs_diff_scores": self.max_abs_diff_scores,
            "max_abs_diff_maps": self.max_abs_diff_maps,
            "image_auroc_drop_max": self.worst_drop("image_auroc"),
            "pixel_auroc_drop_max": self.worst_drop("pixel_auroc"),
            "size_vs_fp32": self.size_vs_fp32,
            "speedup_vs_fp32": self.speedup_vs_fp32,
        }
        return {f"{prefix}_{name}": value for name, value in figures.items() if value is not None}


def written_file(fmt: str, out: Path, input_kind: str, size: int, runtime: OnnxRuntime | TorchScriptRuntime) -> dict:
    """The ``ExportReport`` fields of the file itself: where it is, what it takes, its bytes and its stored tensors."""
    file_bytes = out.stat().st_size
    return {
        "format": fmt,
        "path": str(out),
        "input": f"{input_kind} [B, 3, {size}, {size}]",
        "file_bytes": file_bytes,
        "file_mb": file_bytes / 2**20,
        "weights_bytes": sum(runtime.weights_bytes.values()),
        "weights_bytes_by_dtype": runtime.weights_bytes,
    }


def check_export_options(fmt: str, precision: str, max_drop: float) -> None:
    """Refuse a format, precision or accepted drop this module cannot honour, before any work."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if fmt != "onnx" and precision != "fp32":
        raise ExportError(f"a {fmt} export is fp32 only; precision {precision} needs the onnx format")
    if not max_drop >= 0:  # NaN too
        raise ExportError(
            f"max drop {max_drop} is not a drop: give the largest image ROC-AUC drop per task to accept, "
            f"0 or more (default {MAX_DROP})"
        )


def learned_splits(detector: Detector) -> list[CategorySplit]:
    """The dataset splits of the tasks the detector learned, in task order."""
    from cvad.data import load_task_stream

    return load_task_stream(detector.config.dataset.model_copy(update={"tasks": detector.tasks})).splits


def verification_images(detector: Detector, per_task: int = 4) -> torch.Tensor:
    """Up to ``per_task`` test images of every task the detector learned (good and defective alternating), uint8."""
    from cvad.data.base import read_rgb

    size = detector.config.dataset.image_size
    images = []
    for split in learned_splits(detector):
        good = [s for s in split.test if s.label == 0]
        bad = [s for s in split.test if s.label == 1]
        mixed = [s for pair in zip(bad, good) for s in pair] + bad[len(good) :] + good[len(bad) :]
        images += [read_rgb(sample.image, size) for sample in mixed[:per_task]]
    return torch.stack(images)


def export_detector(
    detector: Detector,
    fmt: Format,
    out: Path,
    images: torch.Tensor,
    input_kind: InputKind = "uint8",
    relative_tolerance: float = RELATIVE_TOLERANCE,
) -> ExportReport:
    """Export ``detector`` to ``out``, verified on ``images`` (uint8 [N, 3, S, S]); nothing is written if it fails."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    deployed = DeployedDetector(detector.model.eval(), input_kind, detector.decision_rule()).eval()
    inputs = images if input_kind == "uint8" else images.float() / 255
    out = Path(out)
    with written_in_place(out) as partial:
        with torch.no_grad():  # one pass per batch: the outputs and the thresholds each image is judged by
            scored = [deployed.scored(batch) for batch in inputs.split(VERIFY_BATCH)]
            expected = [deployed.outputs(out) for out in scored]
            judged_by = [deployed.rule.thresholds_for(out) for out in scored] if deployed.rule else []
        example = inputs[:1].expand(2, -1, -1, -1).contiguous()  # torch.export holds a batch of 1 to size 1
        runtime = (to_onnx if fmt == "onnx" else to_torchscript)(deployed, example, partial, detector)
        try:
            got = [runtime.run(batch) for batch in inputs.split(VERIFY_BATCH)]
        except Exception as exc:  # e.g. a batch size the graph fixed, or an op the runtime lacks
            raise ExportError(f"the {fmt} export of {describe(detector)} does not run in its runtime: {exc}") from None
        diffs, tolerances = compare(expected, got, relative_tolerance)
        if any(d > t for d, t in zip(diffs, tolerances)):
            raise ExportError(
                f"the {fmt} export of {describe(detector)} does not match PyTorch on the run's test images: "
                f"max |difference| scores {diffs[0]:.3g} (tolerance {tolerances[0]:.3g}), "
                f"maps {diffs[1]:.3g} (tolerance {tolerances[1]:.3g}); nothing was written"
            )
        flipped = decisions_flipped(expected, got, judged_by, tolerances)
        if flipped:
            raise ExportError(
                f"the {fmt} export of {describe(detector)} decides otherwise than PyTorch on the run's test images "
                f"({flipped}) where the scores are not near the threshold; nothing was written"
            )
        one = inputs[:1]
        exported_time = time_calls(lambda: runtime.run(one))
        with torch.inference_mode():
            pytorch_time = time_calls(lambda: deployed(one))
    return ExportReport(
        **written_file(fmt, out, input_kind, detector.config.dataset.image_size, runtime),
        images_checked=len(inputs),
        max_abs_diff_scores=diffs[0],
        max_abs_diff_maps=diffs[1],
        tolerance_scores=tolerances[0],
        tolerance_maps=tolerances[1],
        latency_ms=exported_time.median_ms,
        latency_iqr_ms=exported_time.iqr_ms,
        pytorch_latency_ms=pytorch_time.median_ms,
        threads=torch.get_num_threads(),
        outputs=deployed.output_names,
    )


@contextlib.contextmanager
def written_in_place(out: Path) -> Iterator[Path]:
    """A temporary file beside ``out`` to write and verify, moved into place only when the block succeeds: a failed
    export leaves nothing, not even a partial file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(handle)
    try:
        yield Path(partial)
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def compare(
    expected: list[tuple[torch.Tensor, ...]], got: list[tuple[np.ndarray, ...]], relative_tolerance: float
) -> tuple[list[float], list[float]]:
    """Max |difference| per output over every batch, and each output's tolerance (relative to its largest value)."""
    diffs, tolerances = [], []
    for index in range(len(OUTPUT_NAMES)):  # the scores; decisions are checked by decisions_flipped
        reference = np.concatenate([batch[index].numpy() for batch in expected])
        exported = np.concatenate([batch[index] for batch in got])
        if exported.shape != reference.shape:
            raise ExportError(
                f"the export returned {OUTPUT_NAMES[index]} of shape {exported.shape}, not {reference.shape}"
            )
        diff = np.abs(exported.astype(np.float64) - reference).max()
        diffs.append(float(diff) if np.isfinite(diff) else float("inf"))
        tolerances.append(relative_tolerance * max(float(np.abs(reference).max()), 1e-6))
    return diffs, tolerances


def decisions_flipped(
    expected: list[tuple[torch.Tensor, ...]],
    got: list[tuple[np.ndarray, ...]],
    judged_by: list[tuple[torch.Tensor, torch.Tensor]],
    tolerances: list[float],
) -> str:
    """What the export decides otherwise than PyTorch where PyTorch's score is farther than the score tolerance from
    its threshold (a score within it may fall either side); empty when nothing does."""
    problems = []
    for batch, exported, (image_t, pixel_t) in zip(expected, got, judged_by):
        scores, maps, defect, masks = (value.numpy() for value in batch)
        far_images = np.abs(scores - image_t.numpy()) > tolerances[0]
        far_pixels = np.abs(maps - pixel_t.numpy()[:, None, None]) > tolerances[1]
        problems.append(
            (int(((exported[2] != defect) & far_images).sum()), int(((exported[3] != masks) & far_pixels).sum()))
        )
    images, pixels = (sum(p[i] for p in problems) for i in range(2))
    return f"{images} images, {pixels} pixels" if images or pixels else ""


class OnnxRuntime:
    """An exported ONNX file in ONNX Runtime (CPU, as many threads as torch uses here)."""

    def __init__(self, path: Path, output_names: tuple[str, ...]) -> None:
        import onnx
        import onnxruntime

        self.output_names = output_names
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.weights_bytes = onnx_weights_bytes(onnx.load(str(path)))

    def run(self, images: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(list(self.output_names), {"images": images.numpy()}))


class TorchScriptRuntime:
    """An exported TorchScript file, loaded back as the device would load it."""

    def __init__(self, path: Path) -> None:
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.weights_bytes: dict[str, int] = {}
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            key = str(tensor.dtype).removeprefix("torch.")
            self.weights_bytes[key] = self.weights_bytes.get(key, 0) + tensor.numel() * tensor.element_size()

    def run(self, images: torch.Tensor) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            return tuple(output.numpy() for output in self.module(images))


def onnx_weights_bytes(model) -> dict[str, int]:
    """Bytes of an ONNX graph's stored tensors (initializers) by element type."""
    import onnx

    sizes: dict[str, int] = {}
    for initializer in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
        key = np.dtype(dtype).name
        sizes[key] = sizes.get(key, 0) + int(np.prod(initializer.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return sizes


def keeps_stored_codes(node) -> bool | None:
    """Constant folding's rule for a graph node: never decode stored codes (uint8, int8, fp16 values read as float32)
    into float32 constants, so that the file holds the bytes ``memory_mb`` counts (``compression``); None leaves
    every other node to the optimizer's own rule (it folds batch norms into fp32 convolutions, as before)."""
    import onnx_ir as ir

    coded = (ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.FLOAT16)
    if node.op_type == "Cast" and node.inputs and node.inputs[0] is not None and node.inputs[0].dtype in coded:
        return False
    return None


def to_onnx(deployed: DeployedDetector, example: torch.Tensor, path: Path, detector: Detector) -> OnnxRuntime:
    """torch.export the deployed path with a free batch size, convert it to ONNX and load it in ONNX Runtime."""
    from onnxscript.optimizer import optimize_ir

    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            # torch.export first and on its own: torch.onnx.export would quietly fix a batch size it cannot keep free.
            program = torch.export.export(
                deployed, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, strict=False
            )
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=["images"], output_names=list(deployed.output_names),
                external_data=False, optimize=False,
            )  # fmt: skip
            optimize_ir(onnx_program.model, should_fold=keeps_stored_codes)
            onnx_program.save(str(path))
    except Exception as exc:
        raise ExportError(f"{describe(detector)} cannot export to ONNX: {blocker(exc)}") from None
    return OnnxRuntime(path, deployed.output_names)


def to_torchscript(
    deployed: DeployedDetector, example: torch.Tensor, path: Path, detector: Detector
) -> TorchScriptRuntime:
    """Trace the deployed path (verification then runs batches of another size, so a baked-in shape fails)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trace's own warnings (deprecation, constants); verification decides
            traced = torch.jit.trace(deployed, example, check_trace=False)
        torch.jit.save(traced, str(path))
    except Exception as exc:
        raise ExportError(f"{describe(detector)} cannot export to TorchScript: {blocker(exc)}") from None
    return TorchScriptRuntime(path)


def describe(detector: Detector) -> str:
    """The detector by its configuration's one name (``cvad.catalog.config_name``)."""
    return config_name(detector.config.to_dict())


def blocker(exc: BaseException) -> str:
    """The op or the line of cvad's code that stopped an export, out of torch's long error text."""
    text = str(exc)
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing:
        return f"ONNX has no conversion for the op {missing.group(1)}"
    summary = re.search(r"## Exception summary\s*\n\s*(.+?)(?:\n\n|\(Refer|$)", text, re.S)
    if summary:
        reason = summary.group(1)
    else:  # torch.export's own errors: a headline, then "- " lines with the detail
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
        reason = " ".join([lines[0], *(line for line in lines[1:3] if line.startswith("- "))])
    reason = " ".join(reason.split())[:400]
    calls = re.findall(r'File "([^"]*/cvad/[^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    if calls:
        file, line, code = calls[-1]
        return f"`{code.strip()}` ({Path(file).name}:{line}) does not trace: {reason}"
    return reason
