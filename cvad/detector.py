"""A fitted detector as one file: what a trial learned, kept so it can be exported without training again.

The file (``detector.pt``, a ``torch.save`` of plain dicts and tensors, read with
``weights_only=True``) holds the run config, the task list, and the model's
``fitted_state()``: everything fitting changed (trained networks, banks, Gaussians,
prototypes), not the frozen pretrained extractors, which are rebuilt from their weight
source when the file is loaded and checked against the digest stored beside them. It also holds
what the device keeps to decide and to learn the next task: each step's calibrated thresholds,
the replay buffer (replay strategies; its bytes are in ``memory_mb`` too) and the result record so
far, whose matrices ``cvad learn`` extends.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cvad
from cvad.config import RunConfig, validate_config
from cvad.continual.calibration import ThresholdSet
from cvad.continual.replay import ReplayBuffer
from cvad.decision import DecisionRule
from cvad.models import AnomalyModel, build_model
from cvad.models.components.frozen import extractor_digest
from cvad.record import TrialRecord
from cvad.runtime import seed_everything  # the trial's seeding, so that random-weight networks come out the same
from cvad.untrusted import UntrustedFileError, load_untrusted

DETECTOR_FILE = "detector.pt"
DETECTOR_FORMAT = "cvad-detector/2"
READABLE_FORMATS = ("cvad-detector/1", DETECTOR_FORMAT)  # 1: no thresholds, replay buffer or record


class DetectorError(ValueError):
    """A detector file that cannot be loaded here; the message says why and what to do."""


@dataclass
class Detector:
    """A loaded detector: the fitted model (eval mode, CPU), the run config it came from, its tasks, and what it
    keeps to decide and learn on (thresholds, replay buffer, the record so far; absent in a format-1 file)."""

    model: AnomalyModel
    config: RunConfig
    tasks: list[str]
    thresholds: ThresholdSet = field(default_factory=ThresholdSet)
    replay: ReplayBuffer | None = None
    record: TrialRecord | None = None
    format: str = DETECTOR_FORMAT

    def decision_rule(self) -> DecisionRule | None:
        return DecisionRule(self.thresholds) if self.thresholds.steps else None


def detector_bytes(
    model: AnomalyModel,
    config: RunConfig,
    tasks: list[str],
    thresholds: ThresholdSet | None = None,
    replay: ReplayBuffer | None = None,
    record: TrialRecord | None = None,
) -> bytes:
    """The detector file's content for a fitted ``model`` of ``config`` trained on ``tasks``, with the thresholds it
    decides with, its replay buffer and the record of its stream so far."""
    content = {
        "format": DETECTOR_FORMAT,
        "cvad_version": cvad.__version__,
        "config": config.to_dict(),
        "tasks": list(tasks),
        "state": {key: value.detach().cpu().contiguous() for key, value in model.fitted_state().items()},
        "frozen": {
            path: {"weights": extractor.weights.as_dict(), "digest": extractor_digest(extractor)}
            for path, extractor in model.frozen_extractors().items()
        },
        "thresholds": (thresholds or ThresholdSet()).as_dict(),
        "replay": None if replay is None else replay.state(),
        "record": None if record is None else record.with_detector(None).to_text(),
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def load_detector(path: Path, origin: str = "a file given to cvad") -> Detector:
    """Rebuild the fitted model stored in ``path``; its frozen extractors must be the very ones it was fitted on.

    ``origin``: where the file came from, in words, for the refusal of a file that is not what it claims."""
    path = Path(path)
    try:
        content = load_untrusted(path, "a detector file", origin)
    except FileNotFoundError:
        raise DetectorError(f"no detector file at {path}") from None
    except UntrustedFileError as exc:
        raise DetectorError(str(exc)) from None
    if not isinstance(content, dict) or content.get("format") not in READABLE_FORMATS:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise DetectorError(
            f"{path} is not a cvad detector file this version reads (format: {found!r}; reads "
            f"{', '.join(READABLE_FORMATS)}); give the detector.pt a `cvad run` wrote"
        )
    config = validate_config(content["config"])
    seed_everything(config.seed)
    model = build_model(config.model.name, config.model.params, config.setup(tasks=len(content["tasks"])))
    extractors = model.frozen_extractors()
    for module_path, saved in content["frozen"].items():
        extractor = extractors.get(module_path)
        if extractor is None or extractor_digest(extractor) != saved["digest"]:
            weights = saved["weights"]
            here = extractor.weights.source if extractor is not None else "none"
            raise DetectorError(
                f"{path}: the {config.backbone.name} weights loaded here ({here}) are not the ones the detector was "
                f"fitted on ({weights['source']}, sha256 {weights['sha256']}); make those weights available "
                "(backbone.weights names a file, or the same cache or package) and retry"
            )
    try:
        model.load_fitted(content["state"])
    except (KeyError, RuntimeError) as exc:
        raise DetectorError(f"{path}: {exc}") from None
    replay = content.get("replay")
    return Detector(
        model.eval(),
        config,
        list(content["tasks"]),
        ThresholdSet.from_dict(content.get("thresholds") or {"image": [], "pixel": []}),
        None if replay is None else ReplayBuffer.from_state(replay, config.dataset.image_size, config.seed),
        TrialRecord.from_text(content["record"]) if content.get("record") else None,
        content["format"],
    )
