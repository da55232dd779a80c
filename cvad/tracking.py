"""MLflow adapter: a sweep is a parent run, each trial a child run.

Only the sweep driver talks to MLflow (workers send their progress to it), so a
local sqlite store never sees concurrent writers and workers on other nodes need
no access to the tracking server. Everything is logged in batches: one call per
step, never one per metric.

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

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from cvad.metrics import FORGETTING_METRICS, METRICS

DEFAULT_STORE = Path("runs")  # the folder of the local MLflow store (and a sweep's Optuna database and artifacts)
MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_CALL = 1000


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


def default_tracking_uri(store_dir: Path) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None = None, store_dir: Path = DEFAULT_STORE) -> str:
    """The MLflow store to use: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else sqlite in ``store_dir``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store_dir)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a.b.c": value} -> nested config: ``flatten`` read back."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def param_text(value: Any) -> str:
    """A config value as a trial's MLflow param; ``param_value`` reads it back."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def param_value(text: str) -> Any:
    """A logged param as its config value: None, booleans, numbers and lists come back typed, the rest as text."""
    constants = {"None": None, "True": True, "False": False}
    if text in constants:
        return constants[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any trial) when an HTTP tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server at {uri} answered {response.status} on /health")
    except OSError as exc:
        raise TrackingError(
            f"MLflow server at {uri} is unreachable ({exc}); start it (e.g. `mlflow server --host 127.0.0.1 "
            "--port 5000`) or leave out --tracking-uri to use the local store"
        ) from None


def seen_averages(row: list[float | None]) -> float | None:
    values = [v for v in row if v is not None]
    return sum(values) / len(values) if values else None


# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless told it is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@dataclass(frozen=True)
class DataInput:
    """A trial's data as MLflow lists it in the runs' Dataset column: the stream, its file-list digest, where."""

    name: str  # "<dataset>:<task>+<task>+..."
    digest: str  # cvad.data.stream_digest of the file list
    source: str  # the dataset folder, or the built-in cache folder
    tasks: tuple[str, ...]
    images: int

    @classmethod
    def of(cls, dataset: Any, splits: list) -> DataInput:
        """From a dataset config section and its listed splits."""
        from cvad.data import stream_digest

        tasks = tuple(split.name for split in splits)
        source = str(dataset.root) if dataset.root is not None else str(splits[0].train[0].image.parents[3])
        images = sum(len(split.train) + len(split.test) for split in splits)
        return cls(f"{dataset.name}:{'+'.join(tasks)}", stream_digest(splits), source, tasks, images)


def log_metrics(client: Any, run_id: str, values: dict[str, float | None], step: int = 0) -> None:
    """Log ``values`` (None skipped) on a run at ``step``, in as few calls as MLflow allows."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for key, value in values.items() if value is not None]
    for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_CALL])


class SweepTracker:
    """Creates and fills the runs of one sweep in one experiment."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        check_server(tracking_uri)
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {experiment!r} is deleted; restore it or choose another sweep name")
        if found is None:
            location = None
            if artifact_root is not None:
                location = (artifact_root / experiment).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags=EXPERIMENT_KIND
            )
        else:
            self.experiment_id = found.experiment_id
            if "mlflow.experimentKind" not in found.tags:  # a sweep store from before the tag
                self.client.set_experiment_tag(self.experiment_id, *next(iter(EXPERIMENT_KIND.items())))

    # -- the sweep (parent) run ------------------------------------------------------------
    def start_sweep(self, name: str, spec: dict, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"cvad.role": "sweep", **tags})
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            self.client.log_artifacts(run_id, tmp)
        return run_id

    def reopen_sweep(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_sweep(self, run_id: str, status: str, summary: dict[str, float]) -> None:
        metrics = {k: v for k, v in summary.items() if v is not None}
        self.log_metrics(run_id, metrics, step=0)
        self.client.set_terminated(run_id, status=status)

    # -- trials (child runs) -----------------------------------------------------------------
    def start_trial(self, parent_id: str, run_name: str, config: dict, tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_id, "cvad.role": "trial", **tags}
        )
        run_id = run.info.run_id
        params = [Param(k, param_text(v)) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_CALL])
        return run_id

    def log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        log_metrics(self.client, run_id, values, step)

    def log_step(self, run_id: str, step: int, tasks: list[str], rows: dict[str, list[float | None]]) -> None:
        """Metrics after step ``step``: averages over seen tasks and each seen task's value."""
        values: dict[str, float | None] = {}
        for metric in METRICS:
            row = rows[metric]
            values[metric] = seen_averages(row)
            for name, value in zip(tasks, row):
                if value is not None:
                    values[f"task.{name}.{metric}"] = value
        self.log_metrics(run_id, values, step)

    def log_result(self, run_id: str, record: dict, artifacts: dict[str, bytes]) -> None:
        """Final metrics, tags that need the run's outcome, and the artifacts."""
        eff, final = record["efficiency"], record["final"]
        last = len(record["tasks"]) - 1
        values = {k: final.get(k) for k in FORGETTING_METRICS}
        values.update({k: eff[k] for k in ("memory_mb", "memory_bytes", "gflops", "gmacs", "latency_ms")})
        if eff["latency_ms"] is not None:  # a spread that says the machine was busy is kept beside the figure
            values.update(latency_iqr_ms=eff["latency_iqr_ms"], latency_noisy=float(eff["latency_noisy"]))
        values.update({f"memory_mb.{part}": mb for part, mb in eff["memory_breakdown_mb"].items()})
        if record.get("detector"):  # the fitted detector's file size, beside the memory it was priced at
            values["detector_mb"] = record["detector"]["mb"]
        wall = record["wall_seconds"]
        values.update({"train_seconds": wall["train"], "eval_seconds": wall["eval"], "wall_seconds": wall["total"]})
        self.log_metrics(run_id, values, step=last)
        from mlflow.entities import RunTag

        pretrained = str(bool(record["weights"]["pretrained"])).lower()
        tags = [RunTag("cvad.pretrained", pretrained), RunTag("cvad.schema", str(record["schema"]))]
        self.client.log_batch(run_id, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "result.json").write_text(json.dumps(record, indent=1))
            (root / "config.yaml").write_text(yaml.safe_dump(record["config"], sort_keys=False))
            (root / "matrices").mkdir()
            for metric, matrix in record["matrices"].items():
                lines = ["after_step," + ",".join(record["tasks"])]
                for name, row in zip(record["tasks"], matrix):
                    lines.append(name + "," + ",".join("" if v is None else f"{v:.6f}" for v in row))
                (root / "matrices" / f"{metric}.csv").write_text("\n".join(lines) + "\n")
            for relative, data in artifacts.items():
                path = root / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            self.client.log_artifacts(run_id, tmp)

    def store_detector(self, run_id: str, data: bytes) -> None:
        """Keep a trial's fitted detector (``detector.pt``) in its run, so it can be exported without training again.

        The tag ``cvad.detector=stored`` is set after the upload: it never names a run without the file.
        """
        from cvad.detector import DETECTOR_FILE

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / DETECTOR_FILE
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path))
        self.client.set_tag(run_id, "cvad.detector", "stored")

    def finished_record(self, run_id: str) -> dict | None:
        """The result record of a FINISHED trial run (its result.json artifact); None for any other run."""
        try:
            if self.client.get_run(run_id).info.status != "FINISHED":
                return None
            with tempfile.TemporaryDirectory() as tmp:
                return json.loads(Path(self.client.download_artifacts(run_id, "result.json", tmp)).read_text())
        except Exception:  # a run or artifact that is gone: the trial reruns
            return None

    def log_dataset(self, run_id: str, data: DataInput) -> None:
        """The trial's task stream as an MLflow dataset input (the runs table's Dataset column, filterable)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = json.dumps({"tasks": list(data.tasks), "images": data.images})
        dataset = Dataset(name=data.name, digest=data.digest, source_type="local", source=data.source, profile=profile)
        context = InputTag("mlflow.data.context", "training")
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])

    def tag_worker(self, run_id: str, worker: str) -> None:
        """The Ray worker (node:pid) that ran the trial."""
        self.client.set_tag(run_id, "cvad.worker", worker)

    def mark_retried(self, run_id: str) -> None:
        """Ray reran the trial on another node after losing the first one."""
        self.client.set_tag(run_id, "cvad.retried", "true")

    def end_trial(self, run_id: str, status: str, error: str | None = None, details: str | None = None) -> None:
        """Close a trial's run; a failure keeps its one-line error as a tag and the full text as error.txt."""
        if error is not None:
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag("cvad.error", error[:4900])])
            self.client.log_text(run_id, details or error, "error.txt")
        self.client.set_terminated(run_id, status=status)
