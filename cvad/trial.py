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
from cvad.continual.calibration import check_holdout
from cvad.continual.protocol import Learner, LoaderSettings, StreamResult, run_continual
from cvad.continual.replay import ReplayBuffer
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


def new_learner(
    config: RunConfig, tasks: int, device: str, progress: Listener = ignore, features: FeatureStore | None = None
) -> Learner:
    """The configured method, untrained, on the configured strategy (a stream of ``tasks`` tasks)."""
    model = build_model(config.model.name, config.model.params, config.setup(tasks=tasks)).to(device)
    replay = None
    if config.strategy.name == "replay":
        jpeg = config.compression.replay_quality if config.compression.replay == "jpeg" else None
        replay = ReplayBuffer(config.strategy.replay_size, config.dataset.image_size, config.seed, jpeg)
    return Learner(
        model, config.strategy.name, LoaderSettings.of(config, device), config.calibration, replay,
        features=features or FeatureStore(), progress=progress,
    )  # fmt: skip


def trial_record(
    config: RunConfig, learner: Learner, stream: StreamResult, device: str, wall_seconds: dict[str, float]
) -> TrialRecord:
    """The record of a stream learned; the update costs are the largest step's."""
    model = learner.model
    replay = list(learner.replay.stored) if learner.replay is not None else None
    rule = learner.decision_rule()
    efficiency = measure_efficiency(model, config.dataset.image_size, device, replay, rule)
    latency = {"latency_ms": None}
    if config.measure_latency:
        latency = measure_latency(model, config.dataset.image_size, device=device).as_record()
    efficiency |= {
        "update_seconds": max(s.train_seconds for s in stream.steps),
        "update_peak_mb": max(s.update_peak_mb or 0.0 for s in stream.steps),
        "update_state_mb": max(s.update_state_mb or 0.0 for s in stream.steps),
    }
    matrices = stream.matrices
    final = {metric: final_average(matrices[metric]) for metric in METRICS}
    final |= {f"forgetting_{metric}": forgetting(matrices[metric]) for metric in FORGETTING_OF}
    threads = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    thresholds = None
    if learner.decides:
        calibration = config.calibration
        thresholds = learner.thresholds.as_dict() | {
            "image_fpr": calibration.image_fpr,
            "pixel_fpr": calibration.pixel_fpr,
            "matrices": stream.thresholds,
        }
    return TrialRecord(
        config=config.to_dict(),
        tasks=list(stream.tasks),
        matrices=matrices,
        final=final,
        efficiency=efficiency | latency | {"latency_device": f"{device} ({threads})"},
        weights=model.weights.as_dict(),
        steps=tuple(stream.steps),
        wall_seconds=wall_seconds,
        seed=config.seed,
        cvad_version=cvad.__version__,
        thresholds=thresholds,
    )


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
    check_holdout(splits, config.calibration)  # before anything trains
    data_seconds = time.perf_counter() - started
    learner = new_learner(config, len(splits), device, progress, FeatureStore(feature_cache))

    protocol_started = time.perf_counter()
    stream = run_continual(learner, splits)
    wall = {
        "data": data_seconds,
        "protocol": time.perf_counter() - protocol_started,
        "train": sum(s.train_seconds for s in stream.steps),
        "eval": sum(s.eval_seconds for s in stream.steps),
        "total": time.perf_counter() - started,
    }
    record = trial_record(config, learner, stream, device, wall)
    if output_dir is None:
        return record
    return save_outputs(Path(output_dir), record, learner, config, splits, keep_detector)


def save_outputs(
    output_dir: Path, record: TrialRecord, learner: Learner, config: RunConfig, splits: list, keep_detector: bool
) -> TrialRecord:
    """Write the record (atomically, first), then the detector and the overlays of ``splits``; an extra that cannot
    be written becomes a warning in the record. Returns the record as written."""
    device = learner.settings.device
    output_dir.mkdir(parents=True, exist_ok=True)
    detector = None
    if keep_detector:
        detector = detector_bytes(learner.model, config, record.tasks, learner.thresholds, learner.replay, record)
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
        write_overlays(learner.model, splits, config.dataset.image_size, device, Path(output_dir) / "overlays")
    except OSError as exc:
        record = record.with_warning(f"overlays not written: {exc}")
        record.write(record_path)
    return record
