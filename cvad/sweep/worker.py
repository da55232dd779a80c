"""What a Ray worker runs for one trial: ``run_trial`` plus progress forwarding.

The worker never talks to MLflow or Optuna: it sends per-step metrics to the driver
through a queue and returns the result record with its artifact files as bytes.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from cvad import cache_root
from cvad.backbones.weights import RandomWeightsWarning
from cvad.config import validate_config
from cvad.trial import run_trial


def ray_node() -> str:
    """The Ray node this process runs on (two nodes may share a host), or the host name outside Ray."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()[:12]
    return os.uname().nodename


def run_trial_for_sweep(config: dict, number: int, events, threads: int, feature_cache: bool = True) -> dict:
    """Run trial ``number``; return its record, its artifact files ``{relative path: bytes}`` and the worker (Ray node:pid).

    ``events`` is a queue (``ray.util.queue.Queue`` or anything with ``put``) that receives
    ``("step", number, info)`` after each training step of the stream. With ``feature_cache``,
    frozen networks' outputs per training image are shared with the node's other trials
    through ``$CVAD_CACHE/features`` (the records are the same either way).
    """
    torch.set_num_threads(max(1, threads))
    run_config = validate_config(config)
    worker = f"{ray_node()}:{os.getpid()}"

    def forward(event: str, info: dict) -> None:
        if event == "step_done":
            step = info["step"]
            rows = {metric: matrix[step] for metric, matrix in info["matrices"].items()}
            try:
                events.put(("step", number, {"step": step, "steps": info["steps"], "tasks": info["tasks"], "rows": rows, "worker": worker}))
            except Exception:  # progress is best effort: the driver backfills lost steps from the record
                pass

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Random weights are recorded in the result (weights.pretrained) and flagged by the driver.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        cache = cache_root() / "features" if feature_cache else None
        record = run_trial(run_config, progress=forward, output_dir=Path(tmp), feature_cache=cache)
        artifacts = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return {"record": record, "artifacts": artifacts, "worker": worker}
