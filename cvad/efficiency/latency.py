"""Latency: ``measure_latency`` for a model's ``forward``, ``time_calls`` for any runtime, and their ``LatencyReport``.

``measure_latency``: wall time of the whole ``forward`` on one image, under
``torch.inference_mode``, after warm-up: the median of repeated runs and their spread (the
interquartile range). A spread above ``NOISY_SPREAD`` of the median says the machine was busy
while measuring: the figure is flagged as noisy, not kept silently as a fact.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cvad.efficiency.probe import _check_model_device, _eval_mode, _probe_image

NOISY_SPREAD = 0.25  # interquartile range / median above which a latency measurement is flagged


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
