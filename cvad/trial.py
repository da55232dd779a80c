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
from cvad.cost import measure_efficiency
from cvad.efficiency import measure_latency
from cvad.metrics import final_average, forgetting
from cvad.models import build_model
from cvad.models.components.frozen import FeatureStore
from cvad.overlays import write_overlays

RESULT_SCHEMA = 2  # 2: MB = 2^20 bytes and GFLOPs = 2 x GMACs, raw counts kept (1: MB = 10^6 bytes, GFLOPs = GMACs)
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


def run_trial(
    config: RunConfig, progress: Progress | None = None, output_dir: Path | None = None, feature_cache: Path | None = None
) -> dict:
    """Run one continual experiment end to end and return its result record.

    With ``output_dir``, anomaly-map overlays of each task's first defective test images
    are written to ``output_dir/overlays`` (after the last step). ``feature_cache`` is a folder
    where frozen networks' outputs per training image are kept for later runs (a sweep's);
    the record is the same with or without it.
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

    settings = LoaderSettings(config.dataset.image_size, config.dataset.batch_size, device, config.seed, config.dataset.eval_batch_size)
    protocol_started = time.perf_counter()
    stream = run_continual(
        model,
        splits,
        strategy=config.strategy.name,
        settings=settings,
        replay_size=config.strategy.replay_size,
        progress=notify,
        features=FeatureStore(feature_cache),
    )
    protocol_seconds = time.perf_counter() - protocol_started

    replay = stream.replay.images if stream.replay is not None else None
    efficiency = measure_efficiency(model, config.dataset.image_size, device, replay)
    latency = {"latency_ms": None}
    if config.measure_latency:
        latency = measure_latency(model, config.dataset.image_size, device=device).as_record()
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
        "efficiency": efficiency
        | latency
        | {
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
