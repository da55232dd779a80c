"""Efficiency accounting: GFLOPs of the whole inference path, stored bytes, latency.

GFLOPs
------
``count_gflops`` traces ``model.forward`` on one image with fvcore's
``FlopCountAnalysis``, which counts multiply-adds (MACs), and reports **GFLOPs = 2 x GMACs**,
the paper's convention (its STFPM row, teacher + student through MobileNetV2's first
stride-32 block, is 2 x 2 x 0.2255 G multiply-adds = 0.90 GFLOPs); the raw GMACs are kept
beside it. The rules below are in multiply-adds (an elementwise op or a comparison counts
as one, like a multiply-add). fvcore only knows convolutions, linear layers, matmuls, einsum, norms and
a few resamplers; everything else would silently count as zero, which hides exactly the
cost that differs between anomaly detectors (k-NN distances, Mahalanobis products,
attention, routing). This module adds handles so that every op that computes values
is counted, with these rules:

* Contractions count their multiply-adds (bias additions folded into them are not
  counted separately, as fvcore does for conv and linear):
  - ``mm``/``bmm``/``matmul``/``addmm``/``baddbmm``/``mv``/``dot``: output elements x the
    contracted length (this also covers broadcast batch dimensions, which fvcore's own
    matmul handle gets wrong when the first operand is the smaller one);
  - ``einsum``: fvcore's handle (the multiply-adds of numpy's optimal contraction path);
  - ``cdist`` (x1 [*, P, D], x2 [*, R, D]): ``B*P*R*D`` (the per-pair root and the row
    norms of the matmul formulation, a 1/D fraction of it, are left out);
  - ``scaled_dot_product_attention`` (q [*, L, E], k [*, S, E], v [*, S, Ev]):
    ``rows*S*E`` for QK^T plus ``rows*S*Ev`` for AV (rows = batch*heads*L), plus the
    elementwise work an explicit implementation does: scaling q (``rows*E``), the
    softmax (3 per score, see below) and adding a float mask (``rows*S``; a boolean
    mask is a masked fill, which is free). The fused kernel and timm's explicit
    attention (``fused_attn = False``) therefore count the same;
  - dense linear algebra, per matrix of size n and per right-hand-side column:
    Cholesky ``n^3/6``, LU ``n^3/3``, inverse ``n^3``, determinant ``n^3/3``,
    triangular solve ``n^2/2``, ``cholesky_solve`` and LU-based solve ``n^2`` (two
    triangular solves), ``linalg_solve`` = LU + ``n^2`` per column.
* Elementwise ops count **1 per output element**, whatever they compute: arithmetic
  (add, sub, mul, div, pow), transcendental functions (sqrt, exp, log, erf),
  activations (ReLU, ReLU6, GELU, SiLU, sigmoid), clamps and comparisons. ``addcmul``,
  ``addcdiv`` and ``lerp`` count 2 (a multiply and an add).
* Reductions count **1 per input element**: sum, mean, norms (a square-accumulate is one
  multiply-add), min/max/argmin/argmax (one comparison each), ``topk`` and ``sort``
  (one pass over the input: exact for a top-k with small k, a lower bound for a full
  sort). ``var``/``std`` and ``logsumexp`` count 2 per input element,
  ``cosine_similarity`` 3 (three dot products).
* Composites: ``softmax``/``log_softmax`` count 3 per element (exp, the row sum, the
  divide or subtract; the max-shift for stability is not counted). ``batch_norm`` at
  inference right after a convolution is **free**: a deployed model folds it into the
  convolution's weights and bias (TFLite, ONNX Runtime and OpenVINO all do). Elsewhere
  it is one multiply-add per element (``x * a + b`` with ``a``, ``b`` folded from the
  running statistics and the affine weights; fvcore counts 2, a multiply and an add,
  which breaks its own MAC convention); with batch statistics it counts 5 per element,
  like fvcore's ``layer_norm``/``group_norm``, which are kept.
* Pooling counts output elements x kernel area (average and max pooling alike);
  adaptive pooling counts its input elements (fvcore). Bilinear upsampling counts 4 per
  output element and nearest 1 (fvcore); bicubic 16, trilinear 8, linear 2.
  A Gaussian blur is a convolution, counted as such; its padding is free.
* Free (no value is computed, only located, moved, viewed or created): shape and view
  ops, copies and dtype casts, concatenation and padding, indexing, gathers and
  selections by a mask already computed (``where``, ``masked_fill``), tensor creation,
  and dropout (the identity at inference).

Any other op is left uncounted and returned in ``FlopReport.uncounted_ops`` (fvcore's
warnings about it are silenced), so callers can tell a complete count from a partial
one. The count is that of the path the traced image took through ``forward``.

With these rules the reference backbones at 224 px keep their published cost: the
elementwise work adds 0.3-4.5 % to the multiply-adds of their conv and linear layers
(MobileNetV2 0.314 GMACs against 0.301 G, DeiT-Tiny 1.266 with attention, ResNet-18 1.821).

Memory
------
``memory_footprint`` adds ``numel * element_size`` of the real tensors a model stores,
in MB = 2^20 bytes (the paper's unit: its replay-100 and replay-40 rows differ by
60 x 150,528 B / 2^20 = 8.61 MB); the byte counts are kept. Storage is counted once: a
tensor listed in two parts (a teacher's layers shared with the student) counts in the
first part only, and views count the storage bytes they actually cover, once.

Latency
-------
``measure_latency``: wall time of the whole ``forward`` on one image, under
``torch.inference_mode``, after warm-up: the median of repeated runs and their spread (the
interquartile range). A spread above ``NOISY_SPREAD`` of the median says the machine was busy
while measuring: the figure is flagged as noisy, not kept silently as a fact.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# torch announces torch.jit's deprecation on every use; fvcore's tracing still works and is what we count with.
_JIT_DEPRECATION = r".*torch\.jit\..* is deprecated"

with warnings.catch_warnings():  # fvcore scripts a loss function at import
    warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

BYTES_PER_MB = 2**20  # MiB, the paper's MB
NOISY_SPREAD = 0.25  # interquartile range / median above which a latency measurement is flagged
FLOPS_PER_MAC = 2  # the paper's convention
_PROBE_SEED = 0

# A handle maps a traced op's (inputs, outputs), lists of torch._C.Value, to its FLOPs.
Handle = Callable[[list[Any], list[Any]], float]


@dataclass
class FlopReport:
    """Per-image cost of ``forward``: GMACs counted, GFLOPs = 2 x GMACs."""

    gmacs: float
    by_operator: dict[str, float]  # GMACs per op, fvcore's names ("conv", "cdist", "add", ...)
    uncounted_ops: list[str]  # ops met in the trace that have no handle and are not free

    @property
    def gflops(self) -> float:
        return FLOPS_PER_MAC * self.gmacs


@dataclass
class MemoryReport:
    """Bytes a deployed model stores, each storage counted once; MB = 2^20 bytes."""

    bytes_by_part: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_part.values())

    @property
    def total_mb(self) -> float:
        return self.total_bytes / BYTES_PER_MB

    @property
    def breakdown_mb(self) -> dict[str, float]:
        return {part: count / BYTES_PER_MB for part, count in self.bytes_by_part.items()}


# --------------------------------------------------------------------------- handles


def _numel(value: Any) -> int:
    """Elements of a traced tensor value; 0 for anything that is not a tensor of known shape."""
    shape = get_shape(value)
    return math.prod(shape) if shape is not None else 0


def _last_dim(value: Any) -> int:
    shape = get_shape(value)
    if not shape:
        raise ValueError(f"expected a tensor with at least one dimension in the trace, got shape {shape}")
    return shape[-1]


def _per_element(cost: float) -> Handle:
    """``cost`` FLOPs per element of the largest tensor the op reads or writes.

    For an elementwise op that is its (broadcast) output, for a reduction its input.
    Scalars and non-tensor values (traced shape arithmetic) count nothing.
    """

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        return cost * max((_numel(v) for v in [*inputs, *outputs]), default=0)

    return handle


def _contraction(left_operand: int) -> Handle:
    """Matrix products: output elements x the contracted length of the left operand."""

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        return _numel(outputs[0]) * _last_dim(inputs[left_operand])

    return handle


def _cdist(inputs: list[Any], outputs: list[Any]) -> float:
    return _numel(outputs[0]) * _last_dim(inputs[0])


def _scaled_dot_product_attention(inputs: list[Any], outputs: list[Any]) -> float:
    query, key, value, mask = inputs[:4]
    rows = _numel(outputs[0]) // _last_dim(outputs[0])  # batch * heads * L
    keys = get_shape(key)[-2]  # S
    scores = rows * keys
    flops = rows * _last_dim(query)  # scaling q
    flops += scores * _last_dim(query)  # Q K^T
    flops += 3 * scores  # softmax
    flops += scores * _last_dim(value)  # A V
    if get_shape(mask) is not None and mask.type().scalarType() != "Bool":
        flops += scores  # additive float mask
    return flops


def _square_matrices(value: Any) -> tuple[int, int]:
    """(number of matrices, n) for a batch of n x n matrices."""
    shape = get_shape(value)
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"expected a batch of square matrices in the trace, got shape {shape}")
    return math.prod(shape[:-2]), shape[-1]


def _factorization(cubic_coefficient: float, matrix: int = 0) -> Handle:
    """Factorizations and inverses: ``cubic_coefficient * n^3`` per matrix."""

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        count, n = _square_matrices(inputs[matrix])
        return cubic_coefficient * count * n**3

    return handle


def _solve(per_column: float, matrix: int, lu: bool = False) -> Handle:
    """Solves: ``per_column * n^2`` per right-hand-side column (``n`` per solution element), plus LU if asked."""

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        count, n = _square_matrices(inputs[matrix])
        flops = per_column * _numel(outputs[0]) * n
        if lu:
            flops += count * n**3 / 3
        return flops

    return handle


def _int_list(value: Any) -> list[int]:
    """A traced int or list of ints: a constant, or a list built from constants."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        items = [item.toIValue() for item in node.inputs()]
    else:
        constant = value.toIValue()
        items = [constant] if isinstance(constant, int) else list(constant or [])
    if not items or not all(isinstance(item, int) for item in items):
        raise ValueError(f"expected constant integer sizes in the trace, got {value} from {node.kind()}")
    return items


def _pool(spatial_dims: int) -> Handle:
    """Window pooling: output elements x kernel area."""

    def handle(inputs: list[Any], outputs: list[Any]) -> float:
        kernel = _int_list(inputs[1])
        if len(kernel) == 1:
            kernel = kernel * spatial_dims
        return _numel(outputs[0]) * math.prod(kernel)

    return handle


_CONVOLUTIONS = {"aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution"}


def _batch_norm(inputs: list[Any], outputs: list[Any]) -> float:
    uses_batch_statistics = inputs[5].toIValue()  # (input, weight, bias, mean, var, training, ...)
    if not isinstance(uses_batch_statistics, bool):
        raise ValueError("aten::batch_norm's signature changed: its 6th argument is no longer `training`")
    if uses_batch_statistics:
        return 5 * _numel(inputs[0])
    if inputs[0].node().kind() in _CONVOLUTIONS:
        return 0  # folded into the convolution's weights and bias when deployed
    return _numel(inputs[0])


def _cosine_similarity(inputs: list[Any], outputs: list[Any]) -> float:
    return 3 * max(_numel(inputs[0]), _numel(inputs[1]))


_ELEMENTWISE = [
    # arithmetic
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "neg_",
    "abs",
    "abs_",
    "reciprocal",
    "reciprocal_",
    "pow",
    "pow_",
    "square",
    "square_",
    "outer",
    "remainder",
    "fmod",
    "floor_divide",
    "floor",
    "ceil",
    "round",
    "trunc",
    "frac",
    "sign",
    # transcendental functions
    "sqrt",
    "sqrt_",
    "rsqrt",
    "rsqrt_",
    "exp",
    "exp_",
    "exp2",
    "expm1",
    "log",
    "log_",
    "log2",
    "log10",
    "log1p",
    "erf",
    "sin",
    "cos",
    # activations
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "mish",
    "softplus",
    "prelu",
    # clamps and comparisons
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_min_",
    "clamp_max",
    "clamp_max_",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "isnan",
    "nan_to_num",
    "logical_and",
    "logical_or",
    "logical_xor",
    "logical_not",
    "bitwise_not",
    "__and__",
    "__or__",
]
_REDUCTIONS = [
    "sum", "mean", "prod", "nansum", "nanmean", "amax", "amin", "max", "min", "aminmax",
    "argmax", "argmin", "norm", "linalg_vector_norm", "linalg_norm", "frobenius_norm",
    "cumsum", "cumprod", "all", "any", "count_nonzero", "topk", "sort", "argsort",
    "kthvalue", "median", "nanmedian",
]  # fmt: skip
_TWO_PER_ELEMENT = [
    "addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_", "var", "std", "var_mean",
    "std_mean", "logsumexp", "pairwise_distance", "dist",
]  # fmt: skip

_HANDLES: dict[str, Handle] = {
    **{f"aten::{op}": _per_element(1) for op in _ELEMENTWISE + _REDUCTIONS},
    **{f"aten::{op}": _per_element(2) for op in _TWO_PER_ELEMENT},
    **{f"aten::{op}": _per_element(3) for op in ("softmax", "_softmax", "log_softmax", "_log_softmax")},
    "aten::batch_norm": _batch_norm,
    "aten::cosine_similarity": _cosine_similarity,
    "aten::mm": _contraction(0),
    "aten::bmm": _contraction(0),
    "aten::matmul": _contraction(0),
    "aten::mv": _contraction(0),
    "aten::dot": _contraction(0),
    "aten::vdot": _contraction(0),
    "aten::addmm": _contraction(1),
    "aten::addmv": _contraction(1),
    "aten::baddbmm": _contraction(1),
    "aten::cdist": _cdist,
    "aten::scaled_dot_product_attention": _scaled_dot_product_attention,
    "aten::linalg_cholesky": _factorization(1 / 6),
    "aten::linalg_cholesky_ex": _factorization(1 / 6),
    "aten::cholesky": _factorization(1 / 6),
    "aten::cholesky_inverse": _factorization(1 / 3),
    "aten::linalg_lu_factor": _factorization(1 / 3),
    "aten::linalg_lu_factor_ex": _factorization(1 / 3),
    "aten::linalg_lu": _factorization(1 / 3),
    "aten::linalg_det": _factorization(1 / 3),
    "aten::det": _factorization(1 / 3),
    "aten::logdet": _factorization(1 / 3),
    "aten::linalg_slogdet": _factorization(1 / 3),
    "aten::linalg_inv": _factorization(1),
    "aten::linalg_inv_ex": _factorization(1),
    "aten::inverse": _factorization(1),
    "aten::linalg_solve_triangular": _solve(1 / 2, matrix=0),  # (A, B, upper, left, unitriangular)
    "aten::triangular_solve": _solve(1 / 2, matrix=1),  # (B, A, upper, transpose, unitriangular)
    "aten::cholesky_solve": _solve(1, matrix=1),  # (B, L, upper)
    "aten::linalg_lu_solve": _solve(1, matrix=0),  # (LU, pivots, B)
    "aten::linalg_solve": _solve(1, matrix=0, lu=True),  # (A, B, left)
    "aten::linalg_solve_ex": _solve(1, matrix=0, lu=True),
    **{f"aten::{kind}_pool{d}d": _pool(d) for kind in ("max", "avg") for d in (1, 2, 3)},
    "aten::max_pool2d_with_indices": _pool(2),
    **{f"aten::adaptive_{kind}_pool{d}d": _per_element(1) for kind in ("max", "avg") for d in (1, 3)},
    "aten::adaptive_max_pool2d": _per_element(1),  # adaptive_avg_pool2d: fvcore's, same rule
    "aten::upsample_linear1d": _per_element(2),
    "aten::upsample_bicubic2d": _per_element(16),
    "aten::upsample_trilinear3d": _per_element(8),
    "aten::_upsample_bilinear2d_aa": _per_element(4),
    "aten::upsample_nearest1d": _per_element(1),
    "aten::upsample_nearest3d": _per_element(1),
    "aten::_upsample_nearest_exact2d": _per_element(1),
}

# No value is computed by these: they view, move, select, cast or create data.
_FREE_OPS = {
    f"aten::{op}"
    for op in [
        # shapes and views
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
        "squeeze_", "unsqueeze", "unsqueeze_", "permute", "transpose", "transpose_", "t",
        "numpy_T", "mT", "mH", "movedim", "swapaxes", "expand", "expand_as", "unfold",
        "as_strided", "alias", "size", "dim", "numel", "Int", "Float", "ScalarImplicit",
        "IntImplicit", "FloatImplicit",
        # copies and casts
        "contiguous", "clone", "copy_", "to", "type_as", "detach", "lift_fresh",
        # concatenation, splitting, padding, repetition
        "cat", "concat", "stack", "hstack", "vstack", "chunk", "split", "split_with_sizes",
        "tensor_split", "unsafe_split", "unbind", "pad", "constant_pad_nd", "reflection_pad1d",
        "reflection_pad2d", "replication_pad1d", "replication_pad2d", "repeat",
        "repeat_interleave", "tile", "flip", "roll", "im2col",
        # indexing, gathering and selection by a mask computed elsewhere
        "select", "slice", "narrow", "index", "index_select", "gather", "take_along_dim",
        "masked_select", "masked_fill", "masked_fill_", "where", "index_put_", "nonzero",
        # creation
        "zeros", "zeros_like", "ones", "ones_like", "empty", "empty_like", "full", "full_like",
        "new_zeros", "new_ones", "new_empty", "new_full", "arange", "linspace", "tensor",
        "scalar_tensor", "fill_", "zero_",
        # identity at inference (the model is traced in eval mode)
        "dropout", "dropout_", "feature_dropout", "alpha_dropout",
    ]
}  # fmt: skip


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then give every submodule back its own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != device.type or (device.index is not None and tensor.device != device):
            raise ValueError(
                f"model tensor {name!r} is on {tensor.device}, but device={device}; "
                f"move the model first with model.to({str(device)!r})"
            )


def _probe_image(image_size: int, channels: int, device: torch.device) -> torch.Tensor:
    """One seeded float image in [0, 1], shape [1, C, S, S]."""
    if image_size < 1 or channels < 1:
        raise ValueError(f"image_size and channels must be positive, got {image_size} and {channels}")
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.rand((1, channels, image_size, image_size), generator=generator).to(device)


def count_gflops(
    model: nn.Module, image_size: int, *, channels: int = 3, device: str | torch.device = "cpu"
) -> FlopReport:
    """GFLOPs of ``model.forward`` for one image of ``image_size`` px (see the module docstring)."""
    device = torch.device(device)
    _check_model_device(model, device)
    image = _probe_image(image_size, channels, device)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
        analysis = FlopCountAnalysis(model, (image,))
        analysis.set_op_handle(**_HANDLES)
        analysis.set_op_handle(**dict.fromkeys(_FREE_OPS))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("no_tracer_warning")
        by_operator = {op: macs / 1e9 for op, macs in analysis.by_operator().items() if macs > 0}
        uncounted = sorted(analysis.unsupported_ops())
    return FlopReport(gmacs=sum(by_operator.values()), by_operator=by_operator, uncounted_ops=uncounted)


# --------------------------------------------------------------------------- memory


def _element_runs(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """Start offsets (in elements, within the storage) of the contiguous runs a tensor covers, and the run length."""
    dims = sorted(
        ((size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1 and stride != 0),
        key=lambda dim: dim[1],
    )
    run = 1
    while dims and dims[0][1] == run:  # innermost dims laid out back to back form one run
        run *= dims.pop(0)[0]
    starts = np.array([tensor.storage_offset()], dtype=np.int64)
    for size, stride in dims:
        starts = (starts[:, None] + np.arange(size, dtype=np.int64) * stride).ravel()
    return starts, run


def _merge(intervals: np.ndarray) -> np.ndarray:
    """Union of half-open [start, end) intervals, as sorted disjoint intervals."""
    intervals = intervals[np.argsort(intervals[:, 0], kind="stable")]
    reach = np.maximum.accumulate(intervals[:, 1])
    opens = np.ones(len(intervals), dtype=bool)
    opens[1:] = intervals[1:, 0] > reach[:-1]
    first = np.flatnonzero(opens)
    return np.stack([intervals[first, 0], np.maximum.reduceat(intervals[:, 1], first)], axis=1)


def _covered_bytes(intervals: np.ndarray) -> int:
    return int((intervals[:, 1] - intervals[:, 0]).sum())


def memory_footprint(parts: dict[str, list[torch.Tensor]]) -> MemoryReport:
    """Bytes of the tensors in ``parts``, every storage byte counted once, first part wins."""
    if not isinstance(parts, dict):
        raise TypeError(f"memory_footprint expects a dict of part name -> list of tensors, got {type(parts).__name__}")
    covered: dict[tuple[str, int | None, int], np.ndarray] = {}  # storage -> byte intervals counted so far
    bytes_by_part: dict[str, int] = {}
    for part, tensors in parts.items():
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
            raise TypeError(
                f"part {part!r} must be a list of tensors, got {type(tensors).__name__}; wrap it as [tensor]"
            )
        new_bytes = 0
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"part {part!r}, item {index}: expected a tensor, got {type(tensor).__name__}")
            if tensor.layout != torch.strided:
                raise TypeError(
                    f"part {part!r}, item {index}: only dense tensors are counted, got layout {tensor.layout}"
                )
            if tensor.device.type == "meta":
                raise ValueError(
                    f"part {part!r}, item {index}: a meta tensor has no data to count; pass the real tensor"
                )
            if tensor.numel() == 0:
                continue
            size = tensor.element_size()
            starts, run = _element_runs(tensor)
            intervals = np.stack([starts * size, (starts + run) * size], axis=1)
            key = (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())
            before = covered.get(key)
            merged = _merge(intervals if before is None else np.concatenate([before, intervals]))
            new_bytes += _covered_bytes(merged) - (0 if before is None else _covered_bytes(before))
            covered[key] = merged
        bytes_by_part[part] = new_bytes
    return MemoryReport(bytes_by_part=bytes_by_part)


# --------------------------------------------------------------------------- latency


@dataclass
class LatencyReport:
    """Milliseconds of one whole ``forward`` at batch 1: the median of ``runs`` timed runs and their spread."""

    median_ms: float
    iqr_ms: float  # interquartile range of the timed runs
    runs: int

    @property
    def noisy(self) -> bool:
        return self.iqr_ms > NOISY_SPREAD * self.median_ms

    def as_record(self) -> dict:
        return {
            "latency_ms": self.median_ms,
            "latency_iqr_ms": self.iqr_ms,
            "latency_runs": self.runs,
            "latency_noisy": self.noisy,
        }


def measure_latency(
    model: nn.Module,
    image_size: int,
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str | torch.device = "cpu",
    channels: int = 3,
) -> LatencyReport:
    """Latency of one whole ``forward`` at batch 1: ``warmup`` untimed runs, then ``repeats`` timed ones."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    device = torch.device(device)
    _check_model_device(model, device)
    image = _probe_image(image_size, channels, device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with _eval_mode(model), torch.inference_mode():
        return time_calls(lambda: model(image), warmup=warmup, repeats=repeats, synchronize=synchronize)


def time_calls(
    call: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, synchronize: Callable[[], None] = lambda: None
) -> LatencyReport:
    """Median and spread of ``repeats`` timed calls after ``warmup`` untimed ones (any runtime: torch, ONNX Runtime)."""
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        timings.append((time.perf_counter() - start) * 1e3)
    if len(timings) > 1:
        first, _, third = statistics.quantiles(timings, n=4)
    else:
        first = third = timings[0]
    return LatencyReport(median_ms=statistics.median(timings), iqr_ms=third - first, runs=len(timings))
