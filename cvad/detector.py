"""A fitted detector as one file: what a trial learned, kept so it can be exported without training again.

The file (``detector.pt``, a ``torch.save`` of plain dicts and tensors, read with
``weights_only=True``) holds the run config, the task list, and the model's
``fitted_state()``: everything fitting changed (trained networks, banks, Gaussians,
prototypes), not the frozen pretrained extractors, which are rebuilt from their weight
source when the file is loaded and checked against the digest stored beside them. The
replay buffer is training data, not part of the detector: it is never stored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

import cvad
from cvad.config import RunConfig, validate_config
from cvad.models import AnomalyModel, build_model
from cvad.models.components.frozen import extractor_digest
from cvad.runtime import seed_everything  # the trial's seeding, so that random-weight networks come out the same

DETECTOR_FILE = "detector.pt"
DETECTOR_FORMAT = "cvad-detector/1"


class DetectorError(ValueError):
    """A detector file that cannot be loaded here; the message says why and what to do."""


@dataclass
class Detector:
    """A loaded detector: the fitted model (eval mode, CPU), the run config it came from and its tasks."""

    model: AnomalyModel
    config: RunConfig
    tasks: list[str]


def detector_bytes(model: AnomalyModel, config: RunConfig, tasks: list[str]) -> bytes:
    """The detector file's content for a fitted ``model`` of ``config`` trained on ``tasks``."""
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
    }
    buffer = io.BytesIO()
    torch.save(content, buffer)
    return buffer.getvalue()


def load_detector(path: Path) -> Detector:
    """Rebuild the fitted model stored in ``path``; its frozen extractors must be the very ones it was fitted on."""
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DetectorError(f"no detector file at {path}") from None
    except Exception as exc:
        raise DetectorError(f"{path} is not a readable cvad detector file ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != DETECTOR_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise DetectorError(f"{path} is not a {DETECTOR_FORMAT} file (format: {found!r})")
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
    return Detector(model.eval(), config, list(content["tasks"]))
