"""The names cvad gives MLflow tags, and the tags a trial's run starts with: the one place they are spelled."""

from __future__ import annotations

from typing import Any

import cvad


class Tag:
    """Tag names on cvad's MLflow runs (README "Sweeps" lists what each holds)."""

    ROLE = "cvad.role"  # sweep | trial | export
    SWEEP = "cvad.sweep"
    SAMPLER = "cvad.sampler"
    TRIAL = "cvad.trial"  # the Optuna trial number
    MODEL = "cvad.model"
    BACKBONE = "cvad.backbone"
    STRATEGY = "cvad.strategy"
    DATASET = "cvad.dataset"
    WEIGHTS = "cvad.weights"  # imagenet | random | a path, as configured
    PRETRAINED = "cvad.pretrained"  # true | false, once the record says which weights ran
    SEED = "cvad.seed"
    VERSION = "cvad.version"
    SCHEMA = "cvad.schema"  # the result record's schema, with the record; runs of schema 1 lack it
    ERROR = "cvad.error"  # the one-line error of a failed trial
    PRUNED = "cvad.pruned"  # why a trial was priced over the sweep's budget and never trained
    WORKER = "cvad.worker"  # the Ray node:pid that ran it
    RETRIED = "cvad.retried"  # true: Ray reran it after losing its node
    DETECTOR = "cvad.detector"  # stored: the run holds detector.pt
    WARNING = "cvad.warning"  # what the driver could not write for the run (e.g. its artifacts on a full disk)
    REGISTERED = "cvad.registered"  # NAME:VERSION in the model registry
    PARENT = "mlflow.parentRunId"


class Role:
    SWEEP = "sweep"
    TRIAL = "trial"
    EXPORT = "export"


def trial_tags(config: dict[str, Any], sweep: str, number: int) -> dict[str, str]:
    """The tags a trial's run starts with, from its run config (``RunConfig.to_dict()``)."""
    return {
        Tag.SWEEP: sweep,
        Tag.TRIAL: str(number),
        Tag.MODEL: config["model"]["name"],
        Tag.BACKBONE: config["backbone"]["name"],
        Tag.STRATEGY: config["strategy"]["name"],
        Tag.DATASET: config["dataset"]["name"],
        Tag.WEIGHTS: str(config["backbone"].get("weights", "imagenet")),
        Tag.SEED: str(config.get("seed", 0)),
        Tag.VERSION: cvad.__version__,
    }
