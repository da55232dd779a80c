"""A trial: a pure function from a validated RunConfig to a result record.

``cvad run`` writes the record as ``result.json``; the sweep runs the same function in
Ray workers and MLflow logs what it returns. The record's layout is documented in
README.md ("The result record") and versioned by ``RESULT_SCHEMA``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cvad
from cvad.config import RunConfig
from cvad.continual.protocol import LoaderSettings, run_continual
from cvad.cost import measure_efficiency
from cvad.data import load_task_stream
from cvad.detector import DETECTOR_FILE, detector_bytes
from cvad.efficiency import measure_latency
from cvad.metrics import FORGETTING_OF, METRICS, final_average, forgetting
from cvad.models import build_model
from cvad.models.components.frozen import FeatureStore
from cvad.overlays import write_overlays
from cvad.progress import DataReady, Listener, ignore

RECORD_FILE = "result.json"
RESULT_SCHEMA = 2  # 2: MB = 2^20 bytes and GFLOPs = 2 x GMACs, raw counts kept (1: MB = 10^6 bytes, GFLOPs = GMACs)


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
    config: RunConfig,
    progress: Listener = ignore,
    output_dir: Path | None = None,
    feature_cache: Path | None = None,
    keep_detector: bool = True,
) -> dict:
    """Run one continual experiment end to end and return its result record.

    With ``output_dir``, the record is written there as ``result.json`` (atomically, before
    anything else), then the fitted detector (``detector.pt``, see ``cvad.detector``; unless
    ``keep_detector`` is off) and anomaly-map overlays of each task's first defective test
    images (``output_dir/overlays``); an extra that cannot be written becomes a line in the
    record's ``warnings``, never a lost run. ``feature_cache`` is a folder
    where frozen networks' outputs per training image are kept for later runs (a sweep's);
    the record is the same with or without it.
    """
    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)

    splits = load_task_stream(config.dataset, progress=lambda message: progress(DataReady(message)))
    data_seconds = time.perf_counter() - started
    model = build_model(config.model.name, config.model.params, config.setup(tasks=len(splits))).to(device)

    settings = LoaderSettings(
        config.dataset.image_size, config.dataset.batch_size, device, config.seed, config.dataset.eval_batch_size
    )
    protocol_started = time.perf_counter()
    stream = run_continual(
        model,
        splits,
        strategy=config.strategy.name,
        settings=settings,
        replay_size=config.strategy.replay_size,
        progress=progress,
        features=FeatureStore(feature_cache),
    )
    protocol_seconds = time.perf_counter() - protocol_started

    replay = stream.replay.images if stream.replay is not None else None
    efficiency = measure_efficiency(model, config.dataset.image_size, device, replay)
    latency = {"latency_ms": None}
    if config.measure_latency:
        latency = measure_latency(model, config.dataset.image_size, device=device).as_record()

    matrices = stream.matrices
    final = {metric: final_average(matrices[metric]) for metric in METRICS}
    final |= {f"forgetting_{metric}": forgetting(matrices[metric]) for metric in FORGETTING_OF}
    record = {
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
            "latency_device": (
                f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
            ),
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
        "warnings": [],
    }
    if output_dir is None:
        return record
    detector = detector_bytes(model, config, stream.tasks) if keep_detector else None
    if detector is not None:  # its size beside memory_mb: the file holds what fitting changed, not the frozen backbone
        record["detector"] = {"file": DETECTOR_FILE, "bytes": len(detector), "mb": len(detector) / 2**20}
    # The record first, whole or not at all; then the extras, whose failure is a warning in it.
    record_path = Path(output_dir) / RECORD_FILE
    write_record(record_path, record)
    if detector is not None:
        try:
            write_atomic(Path(output_dir) / DETECTOR_FILE, detector)
        except OSError as exc:
            record["warnings"].append(f"detector not written: {exc}")
            del record["detector"]
            write_record(record_path, record)
    try:
        write_overlays(model, splits, config.dataset.image_size, device, Path(output_dir) / "overlays")
    except OSError as exc:
        record["warnings"].append(f"overlays not written: {exc}")
        write_record(record_path, record)
    return record


class RecordWriteError(OSError):
    """The result record could not be written where asked; the message says where it was saved instead."""


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text`` all at once (a temporary file renamed over it): readers never see half a file."""
    path = Path(path)
    mode = "wb" if isinstance(text, bytes) else "w"
    tmp = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:  # a full disk fails the write, not just the rename: leave no partial file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise


def write_record(path: Path, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` atomically; if that fails (disk full, read-only), save it
    elsewhere and say where."""
    text = json.dumps(record, indent=2)
    try:
        write_atomic(path, text)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"cvad-result-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        try:
            fallback.write_text(text)
        except OSError:
            raise RecordWriteError(f"could not write the result record to {path} ({exc}), nor to {fallback}") from exc
        raise RecordWriteError(
            f"could not write the result record to {path} ({exc}); it was saved to {fallback}: move it there once "
            "there is room"
        ) from exc
