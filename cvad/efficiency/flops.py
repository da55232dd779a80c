"""GFLOPs of the whole inference path: ``count_gflops`` and its ``FlopReport``.

``count_gflops`` traces ``model.forward`` on one image with fvcore's
``FlopCountAnalysis``, which counts multiply-adds (MACs), and reports **GFLOPs = 2 x GMACs**,
the paper's convention (its STFPM row, teacher + student through MobileNetV2's first
stride-32 block, is 2 x 2 x 0.2255 G multiply-adds = 0.90 GFLOPs); the raw GMACs are kept
beside it. What each op counts is set by the handles in ``cvad.efficiency.flop_rules``, whose
docstring lists the rules.

Any op those rules do not cover is left uncounted and returned in ``FlopReport.uncounted_ops`` (fvcore's
warnings about it are silenced), so callers can tell a complete count from a partial
one. The count is that of the path the traced image took through ``forward``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from cvad.efficiency.flop_rules import _FREE_OPS, _HANDLES, _JIT_DEPRECATION
from cvad.efficiency.probe import _check_model_device, _eval_mode, _probe_image

with warnings.catch_warnings():  # fvcore scripts a loss function at import
    warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis

FLOPS_PER_MAC = 2  # the paper's convention


@dataclass
class FlopReport:
    """Per-image cost of ``forward``: GMACs counted, GFLOPs = 2 x GMACs."""

    gmacs: float
    by_operator: dict[str, float]  # GMACs per op, fvcore's names ("conv", "cdist", "add", ...)
    uncounted_ops: list[str]  # ops met in the trace that have no handle and are not free

    @property
    def gflops(self) -> float:
        return FLOPS_PER_MAC * self.gmacs


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
