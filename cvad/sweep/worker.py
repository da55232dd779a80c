"""What a Ray worker runs for one trial: ``run_trial`` plus progress forwarding.

The worker never talks to MLflow or Optuna: it sends per-step metrics to the driver
through a queue (``cvad.sweep.reports``) and returns the result record with its artifact files as bytes.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cvad import cache_root
from cvad.backbones.weights import RandomWeightsWarning
from cvad.config import validate_config
from cvad.progress import Progress, StepDone
from cvad.record import RECORD_FILE, TrialRecord
from cvad.sweep.reports import StepReport, send
from cvad.trial import run_trial


@dataclass(frozen=True)
class TrialOutput:
    """What a worker returns for a trial: its record, its artifact files and the worker (Ray node:pid) that ran it."""

    record: TrialRecord
    artifacts: dict[str, bytes]  # relative path -> content; the fitted detector as ``detector.pt`` when kept
    worker: str


def worker_name() -> str:
    """This process as ``node:pid``: the Ray node it runs on (two nodes may share a host), or the host outside Ray."""
    import ray

    node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else os.uname().nodename
    return f"{node}:{os.getpid()}"


def run_trial_for_sweep(
    config: dict, number: int, events: Any, threads: int, feature_cache: bool = True
) -> TrialOutput:
    """Run trial ``number``; return its record, its artifact files and the worker that ran it.

    ``events`` is a queue (``ray.util.queue.Queue`` or anything with ``put``) that receives
    a :class:`StepReport` after each training step of the stream. With ``feature_cache``,
    frozen networks' outputs per training image are shared with the node's other trials
    through ``$CVAD_CACHE/features`` (the records are the same either way).
    """
    torch.set_num_threads(max(1, threads))
    run_config = validate_config(config)
    worker = worker_name()

    def forward(event: Progress) -> None:
        if isinstance(event, StepDone):
            rows = {metric: matrix[event.step] for metric, matrix in event.matrices.items()}
            send(events, StepReport(number, event.step, event.tasks, rows, worker))

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Random weights are recorded in the result (weights.pretrained) and flagged by the driver.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        cache = cache_root() / "features" if feature_cache else None
        record = run_trial(run_config, progress=forward, output_dir=Path(tmp), feature_cache=cache)
        files = (
            p for p in sorted(Path(tmp).rglob("*")) if p.is_file() and p.name != RECORD_FILE
        )  # the record travels as itself
        artifacts = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in files}
    return TrialOutput(record, artifacts, worker)
