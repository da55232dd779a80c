"""A trial: a pure function from a validated RunConfig to a result record.

``cvad run`` writes the record as ``result.json``; the sweep runs the same function in
Ray workers and MLflow logs what it returns. The record is a ``cvad.record.TrialRecord``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

import cvad
from cvad.config import RunConfig
from cvad.continual.protocol import LoaderSettings, run_continual
from cvad.cost import measure_efficiency
from cvad.data import load_task_stream
from cvad.detector import DETECTOR_FILE, detector_bytes
from cvad.efficiency import measure_latency
from cvad.files import write_atomic
from cvad.metrics import FORGETTING_OF, METRICS, final_average, forgetting
from cvad.models import build_model
from cvad.models.components.frozen import FeatureStore
from cvad.overlays import write_overlays
from cvad.progress import DataReady, Listener, ignore
from cvad.record import RECORD_FILE, DetectorFile, TrialRecord
from cvad.runtime import resolve_device, seed_everything


def run_trial(
    config: RunConfig,
    progress: Listener = ignore,
    output_dir: Path | None = None,
    feature_cache: Path | None = None,
    keep_detector: bool = True,
) -> TrialRecord:
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

    splits = list(load_task_stream(config.dataset, progress=lambda message: progress(DataReady(message))).splits)
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
    threads = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    record = TrialRecord(
        config=config.to_dict(),
        tasks=list(stream.tasks),
        matrices=matrices,
        final=final,
        efficiency=efficiency | latency | {"latency_device": f"{device} ({threads})"},
        weights=model.weights.as_dict(),
        steps=tuple(stream.steps),
        wall_seconds={
            "data": data_seconds,
            "protocol": protocol_seconds,
            "train": sum(s.train_seconds for s in stream.steps),
            "eval": sum(s.eval_seconds for s in stream.steps),
            "total": time.perf_counter() - started,
        },
        seed=config.seed,
        cvad_version=cvad.__version__,
    )
    if output_dir is None:
        return record
    detector = detector_bytes(model, config, stream.tasks) if keep_detector else None
    if detector is not None:  # its size beside memory_mb: the file holds what fitting changed, not the frozen backbone
        record = record.with_detector(DetectorFile(DETECTOR_FILE, len(detector), len(detector) / 2**20))
    # The record first, whole or not at all; then the extras, whose failure is a warning in it.
    record_path = Path(output_dir) / RECORD_FILE
    record.write(record_path)
    if detector is not None:
        try:
            write_atomic(Path(output_dir) / DETECTOR_FILE, detector)
        except OSError as exc:
            record = record.with_detector(None).with_warning(f"detector not written: {exc}")
            record.write(record_path)
    try:
        write_overlays(model, splits, config.dataset.image_size, device, Path(output_dir) / "overlays")
    except OSError as exc:
        record = record.with_warning(f"overlays not written: {exc}")
        record.write(record_path)
    return record
