"""FLOP counting rules: the fvcore op handles that ``count_gflops`` (``cvad.efficiency.flops``) traces with.

They are most of the FLOP counting code, so they live apart from the tracing, with the rules they
implement. The rules below are in multiply-adds (an elementwise op or a comparison counts
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

With these rules the reference backbones at 224 px keep their published cost: the
elementwise work adds 0.3-4.5 % to the multiply-adds of their conv and linear layers
(MobileNetV2 0.314 GMACs against 0.301 G, DeiT-Tiny 1.266 with attention, ResNet-18 1.821).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

# torch announces torch.jit's deprecation on every use; fvcore's tracing still works and is what we count with.
_JIT_DEPRECATION = r".*torch\.jit\..* is deprecated"

with warnings.catch_warnings():  # fvcore scripts a loss function at import
    warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
    from fvcore.nn.jit_handles import get_shape

# A handle maps a traced op's (inputs, outputs), lists of torch._C.Value, to its FLOPs.
Handle = Callable[[list[Any], list[Any]], float]


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
