"""ONNX exports at fp16 or int8, accepted on each task's accuracy rather than elementwise agreement.

- fp16 is weight-only: every float32 initializer but the tiny ones (scalars, shapes) is stored as float16 and
  read through a Cast back to float32. ONNX Runtime's CPU provider folds those Casts when it loads the file and
  computes in float32, so the file is about half the fp32 one and its arithmetic is fp32's on rounded weights.
- int8 is ONNX Runtime's static post-training quantization (QDQ, per-channel int8 weights, uint8 activations)
  of the frozen backbones only (their convolutions and matrix products, with the activations and residual adds
  between them, so that no float op interrupts a run of int8 kernels), calibrated on the run's training images.
  The scoring (PatchCore's nearest-neighbour distances |x|^2 - 2 x.m + |m|^2, Gaussians, task routing, the map
  blur) stays float32: a distance rounded to 8 bits loses the small differences that separate a defect from a
  good patch.

A reduced file differs from PyTorch everywhere by design, so the fp32 tolerance would refuse it; instead the
image and pixel ROC-AUC and F1-max of every learned task are measured on all its test images, for the file
and for the fp32 PyTorch model, and an image ROC-AUC drop beyond ``max_drop`` in any task refuses the export.
"""

from __future__ import annotations

import ast
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cvad.data.base import CategorySplit, read_mask, read_rgb
from cvad.detector import Detector
from cvad.efficiency import time_calls
from cvad.export import (
    MAX_DROP,
    VERIFY_BATCH,
    DeployedDetector,
    ExportError,
    ExportReport,
    InputKind,
    OnnxRuntime,
    check_export_options,
    compare,
    describe,
    to_onnx,
    written_file,
    written_in_place,
)
from cvad.metrics import f1_max, roc_auc

ACCURACY_METRICS = ("image_auroc", "image_f1", "pixel_auroc", "pixel_f1")
CALIBRATION_PER_TASK = 16  # training images per task that int8 activation ranges are calibrated on
FP16_MIN_ELEMENTS = 16  # smaller float32 initializers (scalars, shapes, per-axis constants) stay float32
NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # torch.onnx's record of the module path a node came from
DROP_ROUNDING = 1e-9  # a drop equal to max_drop but for the float rounding of a ROC-AUC difference is accepted


@dataclass
class TaskTestSet:
    """One learned task's test images with their ground truth, as the accuracy check reads them."""

    task: str
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # [N], 1 = defective
    masks: torch.Tensor  # bool [N, S, S]; all background where the dataset has no masks


@dataclass
class TaskAccuracy:
    """One task's threshold-free metrics on all its test images: the fp32 PyTorch model's, the file's, the drop."""

    task: str
    images: int
    pytorch: dict[str, float | None]
    exported: dict[str, float | None]
    drop: dict[str, float | None] = field(init=False)  # PyTorch minus the file: positive is a loss

    def __post_init__(self) -> None:
        self.drop = {
            metric: None if self.pytorch[metric] is None or self.exported[metric] is None
            else self.pytorch[metric] - self.exported[metric]
            for metric in ACCURACY_METRICS
        }  # fmt: skip


def task_test_sets(splits: list[CategorySplit], size: int) -> list[TaskTestSet]:
    """Every test image of every split, with its label and mask, task by task."""
    return [
        TaskTestSet(
            split.name,
            torch.stack([read_rgb(sample.image, size) for sample in split.test]),
            torch.tensor([sample.label for sample in split.test]),
            torch.stack([read_mask(sample.mask, size) for sample in split.test]),
        )
        for split in splits
    ]


def calibration_images(splits: list[CategorySplit], size: int, per_task: int = CALIBRATION_PER_TASK) -> torch.Tensor:
    """Up to ``per_task`` training images of each split, evenly spaced over its (sorted) list: the same images on
    every export, spanning the set rather than its first files."""
    images = []
    for split in splits:
        picks = np.unique(np.linspace(0, len(split.train) - 1, min(per_task, len(split.train))).round().astype(int))
        images += [read_rgb(split.train[index].image, size) for index in picks]
    return torch.stack(images)


def export_reduced(
    detector: Detector,
    out: Path,
    precision: str,
    test_sets: list[TaskTestSet],
    calibration: torch.Tensor,
    input_kind: InputKind = "uint8",
    max_drop: float = MAX_DROP,
) -> ExportReport:
    """Export ``detector`` to ONNX at ``precision`` (fp16 or int8; int8 calibrated on ``calibration``, uint8 training
    images), accepted when no task of ``test_sets`` loses more than ``max_drop`` image ROC-AUC against the fp32
    PyTorch model; nothing is written otherwise. The fp32 ONNX file is built too, to convert and to compare."""
    check_export_options("onnx", precision, max_drop)
    if precision == "fp32":
        raise ExportError("an fp32 export is verified elementwise: use cvad.export.export_detector")
    deployed = DeployedDetector(detector.model.eval(), input_kind, detector.decision_rule()).eval()

    def as_input(images: torch.Tensor) -> torch.Tensor:
        return images if input_kind == "uint8" else images.float() / 255

    with torch.no_grad():
        expected = [[deployed(batch) for batch in as_input(s.images).split(VERIFY_BATCH)] for s in test_sets]
    out = Path(out)
    what = f"the onnx {precision} export of {describe(detector)}"
    with tempfile.TemporaryDirectory(prefix="cvad-fp32-") as work, written_in_place(out) as partial:
        fp32_file = Path(work) / "fp32.onnx"
        example = as_input(test_sets[0].images[:1]).expand(2, -1, -1, -1).contiguous()
        fp32 = to_onnx(deployed, example, fp32_file, detector)
        quantized = None
        if precision == "fp16":
            write_fp16(fp32_file, partial)
        else:
            quantized = write_int8(fp32_file, partial, as_input(calibration), backbone_scopes(detector), what)
        runtime = OnnxRuntime(partial, deployed.output_names)
        try:
            got = [[runtime.run(batch) for batch in as_input(s.images).split(VERIFY_BATCH)] for s in test_sets]
        except Exception as exc:
            raise ExportError(f"{what} does not run in ONNX Runtime: {exc}") from None
        accuracy = [task_accuracy(s, e, g) for s, e, g in zip(test_sets, expected, got)]
        refuse_drops(accuracy, max_drop, what)
        flat_expected, flat_got = sum(expected, []), sum(got, [])
        diffs, _ = compare(flat_expected, flat_got, 0.0)
        one = as_input(test_sets[0].images[:1])
        exported_time = time_calls(lambda: runtime.run(one))
        fp32_time = time_calls(lambda: fp32.run(one))
        with torch.inference_mode():
            pytorch_time = time_calls(lambda: deployed(one))
        fp32_bytes = fp32_file.stat().st_size
    return ExportReport(
        **written_file("onnx", out, input_kind, detector.config.dataset.image_size, runtime),
        images_checked=sum(len(s.images) for s in test_sets),
        max_abs_diff_scores=diffs[0],
        max_abs_diff_maps=diffs[1],
        tolerance_scores=None,
        tolerance_maps=None,
        latency_ms=exported_time.median_ms,
        latency_iqr_ms=exported_time.iqr_ms,
        pytorch_latency_ms=pytorch_time.median_ms,
        threads=torch.get_num_threads(),
        outputs=deployed.output_names,
        precision=precision,
        max_drop=max_drop,
        accuracy=accuracy,
        decisions_differ=images_decided_otherwise(flat_expected, flat_got) if deployed.rule else None,
        quantized_nodes=quantized,
        calibration_images=len(calibration) if precision == "int8" else None,
        fp32_file_bytes=fp32_bytes,
        fp32_latency_ms=fp32_time.median_ms,
    )


def task_accuracy(
    test_set: TaskTestSet, expected: list[tuple[torch.Tensor, ...]], got: list[tuple[np.ndarray, ...]]
) -> TaskAccuracy:
    """The task's metrics from PyTorch's outputs and the file's, batch lists of (scores, maps, ...)."""

    def metrics(scores: np.ndarray, maps: np.ndarray) -> dict[str, float | None]:
        return {
            "image_auroc": roc_auc(scores, test_set.labels),
            "image_f1": f1_max(scores, test_set.labels),
            "pixel_auroc": roc_auc(maps, test_set.masks),
            "pixel_f1": f1_max(maps, test_set.masks),
        }

    pytorch = metrics(*(np.concatenate([batch[i].numpy() for batch in expected]) for i in range(2)))
    exported = metrics(*(np.concatenate([batch[i] for batch in got]) for i in range(2)))
    return TaskAccuracy(test_set.task, len(test_set.images), pytorch, exported)


def refuse_drops(accuracy: list[TaskAccuracy], max_drop: float, what: str) -> None:
    """Raise an ExportError naming every task whose image ROC-AUC dropped by more than ``max_drop``."""
    lost = [
        task for task in accuracy
        if task.drop["image_auroc"] is not None and task.drop["image_auroc"] > max_drop + DROP_ROUNDING
    ]  # fmt: skip
    if lost:
        drops = ", ".join(
            f"{task.task} {task.pytorch['image_auroc']:.3f} -> {task.exported['image_auroc']:.3f} "
            f"(drop {task.drop['image_auroc']:.3f})"
            for task in lost
        )
        raise ExportError(
            f"{what} loses more image ROC-AUC than the accepted {max_drop:g} (--max-drop) on the run's test images: "
            f"{drops}; nothing was written"
        )


def images_decided_otherwise(expected: list[tuple[torch.Tensor, ...]], got: list[tuple[np.ndarray, ...]]) -> int:
    """Test images whose defect decision (``is_defect``) the file makes otherwise than PyTorch."""
    return int(sum((batch[2].numpy() != exported[2]).sum() for batch, exported in zip(expected, got)))


def write_fp16(fp32_file: Path, out: Path) -> None:
    """The fp32 file with its float32 initializers stored as float16 (``fp16_weights``)."""
    import onnx

    onnx.save(fp16_weights(onnx.load(str(fp32_file))), str(out))


def fp16_weights(model):
    """Store each float32 initializer of at least ``FP16_MIN_ELEMENTS`` values as float16, read by a Cast back to
    float32 under its old name, so that no node changes. Other types (uint8 codes, float16 banks, int64 indices)
    and tensors holding a value beyond float16's range (it would become inf) stay as they are."""
    import onnx
    from onnx import helper, numpy_helper

    largest = float(np.finfo(np.float16).max)
    casts = []
    for initializer in model.graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or np.prod(initializer.dims) < FP16_MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(initializer)
        if np.abs(values[np.isfinite(values)]).max(initial=0.0) > largest:
            continue
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(values.astype(np.float16), f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], f"{name}.to_fp32", to=onnx.TensorProto.FLOAT))
    nodes = casts + list(model.graph.node)  # the Casts first: a graph's nodes are stored in topological order
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def backbone_scopes(detector: Detector) -> set[str]:
    """The module paths, inside the exported ``DeployedDetector``, of the detector's frozen pretrained extractors."""
    return {f"model.{path}" for path in detector.model.frozen_extractors()}


def in_scopes(node, scopes: set[str]) -> bool:
    """Whether torch.onnx traced ``node`` to a module under one of ``scopes`` (ONNX Runtime's quantizer keeps the
    record on the nodes it rewrites)."""
    recorded = next((prop.value for prop in node.metadata_props if prop.key == NAME_SCOPES), "[]")
    return bool(scopes & set(ast.literal_eval(recorded)))


def int8_nodes(model, scopes: set[str]) -> int:
    """Nodes under ``scopes`` that read a dequantized tensor: those ONNX Runtime runs as int8 kernels."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        1 for node in model.graph.node
        if node.op_type != "QuantizeLinear" and in_scopes(node, scopes) and dequantized & set(node.input)
    )  # fmt: skip


def write_int8(fp32_file: Path, out: Path, calibration: torch.Tensor, scopes: set[str], what: str) -> int:
    """ONNX Runtime's static quantization (QDQ; int8 weights per output channel, uint8 activations: the pairing its
    x86 kernels run fastest) of the nodes under ``scopes``, activation ranges calibrated (min/max) on
    ``calibration`` as the file takes its input; returns how many nodes compute in int8."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(VERIFY_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.numpy()}

    nodes = [node.name for node in onnx.load(str(fp32_file)).graph.node if in_scopes(node, scopes)]
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process first: that pass fails on these graphs
    try:
        quantize_static(
            str(fp32_file), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
        )  # fmt: skip
    finally:
        logging.disable(previous)
    quantized = int8_nodes(onnx.load(str(out)), scopes)
    if not quantized:
        raise ExportError(f"{what}: no node of the backbone could be quantized (the graph records no module scopes)")
    return quantized
