"""Efficiency accounting: GFLOPs of the whole inference path, stored bytes, latency.

One module per job: ``flops`` (``count_gflops``; the counting rules are in ``flop_rules``),
``memory`` (``memory_footprint``) and ``latency`` (``measure_latency``, ``time_calls``); ``probe``
holds what FLOP counting and latency share (eval mode, the device check, the probe image).
"""

from __future__ import annotations

from cvad.efficiency.flops import count_gflops
from cvad.efficiency.latency import LatencyReport, measure_latency, time_calls
from cvad.efficiency.memory import BYTES_PER_MB, memory_footprint

__all__ = ["BYTES_PER_MB", "LatencyReport", "count_gflops", "measure_latency", "memory_footprint", "time_calls"]
