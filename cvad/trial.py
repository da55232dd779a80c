"""A trial: a pure function from a validated RunConfig to a result record.

``cvad run`` writes the record as ``result.json``; the sweep runs the same function in
Ray workers and MLflow logs what it returns. The record's layout is documented in
README.md ("The result record") and versioned by ``RESULT_SCHEMA``.
"""

from __future__ import annotations

import platform
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import cvad
from cvad.config import RunConfig
from cvad.continual.protocol import METRICS, LoaderSettings, run_continual
from cvad.data import load_task_stream
from cvad.efficiency import count_gflops, measure_latency_ms, memory_footprint
from cvad.metrics import final_average, forgetting
from cvad.models import build_model
from cvad.overlays import write_overlays

RESULT_SCHEMA = 1
Progress = Callable[[str, dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device; use device: cpu or auto")
    return name


def run_trial(config: RunConfig, progress: Progress | None = None, output_dir: Path | None = None) -> dict:
    """Run one continual experiment end to end and return its result record.

    With ``output_dir``, anomaly-map overlays of each task's first defective test images
    are written to ``output_dir/overlays`` (after the last step).
    """
    notify = progress or (lambda event, info: None)
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)

    splits = load_task_stream(config.dataset, progress=lambda msg: notify("data", {"message": msg}))
    data_seconds = time.perf_counter() - started
    model = build_model(
        config.model.name,
        config.model.params,
        backbone=config.backbone.name,
        weights=config.backbone.weights,
        image_size=config.dataset.image_size,
        seed=config.seed,
    ).to(device)

    settings = LoaderSettings(config.dataset.image_size, config.dataset.batch_size, device, config.seed)
    protocol_started = time.perf_counter()
    stream = run_continual(
        model,
        splits,
        strategy=config.strategy.name,
        settings=settings,
        replay_size=config.strategy.replay_size,
        progress=notify,
    )
    protocol_seconds = time.perf_counter() - protocol_started

    parts = model.stored_tensors()
    if stream.replay is not None:
        parts["replay_buffer"] = [stream.replay.images]
    memory = memory_footprint(parts)
    flops = count_gflops(model, config.dataset.image_size, device=device)
    latency = measure_latency_ms(model, config.dataset.image_size, device=device) if config.measure_latency else None
    if output_dir is not None:
        write_overlays(model, splits, config.dataset.image_size, device, Path(output_dir) / "overlays")

    matrices = stream.matrices
    final = {metric: final_average(matrices[metric]) for metric in METRICS}
    final["forgetting_pixel_f1"] = forgetting(matrices["pixel_f1"])
    final["forgetting_image_f1"] = forgetting(matrices["image_f1"])
    return {
        "schema": RESULT_SCHEMA,
        "cvad_version": cvad.__version__,
        "config": config.to_dict(),
        "seed": config.seed,
        "tasks": stream.tasks,
        "matrices": matrices,
        "final": final,
        "efficiency": {
            "memory_mb": memory.total_mb,
            "memory_breakdown_mb": memory.breakdown_mb,
            "memory_bytes": memory.bytes_by_part,
            "gflops": flops.gflops,
            "gflops_by_operator": flops.by_operator,
            "gflops_uncounted_ops": flops.uncounted_ops,
            "latency_ms": latency,
            "latency_device": f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        },
        "weights": model.weights.as_dict(),
        "steps": [
            {
                "step": s.step,
                "trained_on": s.trained_on,
                "train_images": s.train_images,
                "train_seconds": s.train_seconds,
                "eval_seconds": s.eval_seconds,
                "replay_per_task": s.replay_per_task,
            }
            for s in stream.steps
        ],
        "wall_seconds": {
            "data": data_seconds,
            "protocol": protocol_seconds,
            "train": sum(s.train_seconds for s in stream.steps),
            "eval": sum(s.eval_seconds for s in stream.steps),
            "total": time.perf_counter() - started,
        },
    }
