"""The tracking store (MLflow): a sweep is a parent run, each trial a child run.

Only the sweep driver talks to MLflow (workers send their progress to it), so a
local sqlite store never sees concurrent writers and workers on other nodes need
no access to the tracking server. ``TrackingStore`` owns the client, ``Tag`` the tag names,
``cvad.tracking.params`` the config-as-params form, ``cvad.tracking.registry`` the model registry.

What a trial's run holds (the dashboard and ``cvad recommend`` read these names):

- params: the flattened run config (``model.params.bank_size`` ...);
- tags: ``cvad.sweep``, ``cvad.model``, ``cvad.backbone``, ``cvad.strategy``, ``cvad.dataset``,
  ``cvad.weights`` (imagenet / random / a path; ``cvad.pretrained`` true|false after the run),
  ``cvad.seed``, ``cvad.version``, ``cvad.trial`` (Optuna trial number), ``cvad.error`` if it failed,
  ``cvad.schema`` (the result record's schema, after the run; runs logged before schema 2 lack it),
  ``cvad.worker`` (the Ray node:pid that ran it), ``cvad.retried`` (true when Ray reran it after losing its node);
- metrics at step t (task index): ``image_f1``, ``image_auroc``, ``pixel_f1``, ``pixel_auroc``,
  ``routing_accuracy`` = average over the tasks seen after step t, and ``task.<name>.<metric>``
  for each seen task; the last step's values are the final results;
- final metrics: ``forgetting_pixel_f1``, ``forgetting_image_f1``, ``memory_mb`` and ``memory_mb.<part>``
  (MB = 2^20 bytes), ``detector_mb`` (the size of the fitted detector's file), ``memory_bytes``, ``gflops``
  (2 x ``gmacs``, the multiply-adds), ``gmacs``, ``latency_ms`` (median of batch-1 runs; ``latency_iqr_ms`` their
  spread, ``latency_noisy`` 1 when it says the machine was busy), ``train_seconds``, ``eval_seconds``,
  ``wall_seconds``. Schema 1 runs hold ``memory_mb`` in 10^6-byte MB and the multiply-adds as ``gflops``
  (``cvad.selection`` converts them);
- artifacts: ``result.json``, ``config.yaml``, ``matrices/<metric>.csv``, ``overlays/*.png``, and ``detector.pt``
  (the fitted detector) in the runs the sweep's ``detectors`` setting keeps it for, tagged ``cvad.detector=stored``;
- after ``cvad export RUN_ID`` (``cvad.deployment``): ``export_<format>_mb``, ``export_<format>_latency_ms``,
  ``export_<format>_max_abs_diff_scores`` and ``_maps``; with ``--register NAME``, the tag ``cvad.registered``
  (``NAME:VERSION``) and the model logged under ``detector``;
- a dataset input (the runs table's Dataset column): ``<dataset>:<task>+<task>...`` with the digest of the
  stream's file list, its folder, and its tasks and image count as the profile.

Experiments are tagged as model-training experiments (``mlflow.experimentKind``), so MLflow 3's UI
opens them on the runs table rather than its GenAI view.
"""

from cvad.tracking.store import (
    DEFAULT_STORE,
    TrackingError,
    TrackingStore,
    TrialRun,
    check_server,
    resolve_tracking_uri,
)
from cvad.tracking.tags import Role, Tag, trial_tags

__all__ = [
    "DEFAULT_STORE",
    "Role",
    "Tag",
    "TrackingError",
    "TrackingStore",
    "TrialRun",
    "check_server",
    "resolve_tracking_uri",
    "trial_tags",
]
