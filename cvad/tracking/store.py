"""The tracking store: the one owner of cvad's MLflow client and of the run layout (see ``cvad.tracking``).

Every read and write of a sweep, a trial, a detector or an export goes through ``TrackingStore``,
with explicit experiment and run ids. Everything is logged in batches: one call per step, never
one per metric; searches are paginated.
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

from cvad.metrics import METRICS
from cvad.record import RECORD_FILE, TrialRecord
from cvad.stream import TaskStream
from cvad.tracking.params import flatten, param_text, param_value
from cvad.tracking.tags import Role, Tag

DEFAULT_STORE = Path("runs")  # the folder of the local MLflow store (and a sweep's Optuna database and artifacts)
DETECTOR_ARTIFACT = "detector.pt"  # cvad.detector.DETECTOR_FILE, named here without importing torch
MAX_PARAMS_PER_CALL = 100
MAX_METRICS_PER_CALL = 1000
PAGE = 1000  # runs per search page
# MLflow 3 opens an experiment in its GenAI view (traces, judges) unless told it is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPORTS_EXPERIMENT = "cvad-exports"  # where a ``cvad run`` folder's export is registered (it has no run of its own)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


def default_tracking_uri(store_dir: Path) -> str:
    return f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None = None, store_dir: Path = DEFAULT_STORE) -> str:
    """The MLflow store to use: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else sqlite in ``store_dir``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(store_dir)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any trial) when an HTTP tracking server does not answer, or answers but refuses cvad's
    requests (MLflow 3 refuses a Host header outside ``--allowed-hosts``; ``/health`` answers regardless)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    try:
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            with urllib.request.urlopen(f"{base}{path}", timeout=timeout):
                pass
    except urllib.error.HTTPError as exc:
        said = exc.read(300).decode(errors="replace").strip()
        advice = (
            f"a server started with --allowed-hosts must list {urlparse(uri).netloc!r}, the host this URI names"
            if exc.code == 403
            else "see the server's log"
        )
        raise TrackingError(f"MLflow server at {uri} refuses cvad's requests ({exc.code}: {said}); {advice}") from None
    except OSError as exc:
        raise TrackingError(
            f"MLflow server at {uri} is unreachable ({exc}); start it (e.g. `mlflow server --host 127.0.0.1 "
            "--port 5000`) or leave out --tracking-uri to use the local store"
        ) from None


def seen_averages(row: list[float | None]) -> float | None:
    values = [v for v in row if v is not None]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class TrialRun:
    """A trial's run as the store reads it back: what selection and the dashboard tabulate."""

    run_id: str
    experiment_id: str
    sweep: str  # the experiment's name
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    stream: TaskStream
    artifact_uri: str

    @property
    def schema(self) -> int | None:
        """The record schema of its figures: the schema tag; 1 for runs logged before the tag existed."""
        if Tag.SCHEMA in self.tags:
            return int(self.tags[Tag.SCHEMA])
        return 1 if "memory_mb" in self.metrics else None  # None: no record was logged (a failed trial)


@dataclass(frozen=True)
class ModelVersion:
    """A registered detector's version as the registry keeps it: its tags say what it is
    (``cvad.tracking.registry.version_tags``)."""

    version: int
    tags: dict[str, str]
    run_id: str | None
    created_ms: int


class TrackingStore:
    """cvad's runs in one MLflow store (a sqlite file, a folder or a tracking server)."""

    def __init__(self, uri: str, must_exist: bool = False) -> None:
        """``must_exist``: a reader's store; a sqlite file that is not there is an error, not a new store."""
        for noisy in ("alembic", "mlflow"):  # store migrations and provider notes are not the user's concern
            logging.getLogger(noisy).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files: no progress bars
        check_server(uri)
        if must_exist and uri.startswith("sqlite:///"):
            path = uri.removeprefix("sqlite:///")  # relative, or absolute after sqlite:////
            if not os.path.isfile(path):
                raise TrackingError(f"no MLflow store at {path}; run a sweep first, e.g. `cvad sweep sweeps/edge.yaml`")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)

    # -- experiments -----------------------------------------------------------------------------
    def open_experiment(self, name: str, artifact_root: Path | None = None) -> str:
        """The id of experiment ``name``, created (tagged as model training) when missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another sweep name")
        if found is None:
            location = None if artifact_root is None else (artifact_root / name).resolve().as_uri()
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        if "mlflow.experimentKind" not in found.tags:  # a sweep store from before the tag
            self.client.set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return found.experiment_id

    def experiments(self, names: list[str] | None = None) -> dict[str, str]:
        """{experiment id: name} of the named experiments (default: all); a name that is not there is an error."""
        found = {e.experiment_id: e.name for e in self.client.search_experiments()}
        if names:
            missing = sorted(set(names) - set(found.values()))
            if missing:
                listed = ", ".join(sorted(found.values())) or "none"
                raise TrackingError(f"no sweep named {', '.join(missing)} in {self.uri}; sweeps there: {listed}")
            found = {k: v for k, v in found.items() if v in names}
        return found

    # -- the sweep (parent) run ------------------------------------------------------------------
    def start_sweep(self, experiment_id: str, name: str, spec: dict, tags: dict[str, str]) -> str:
        run = self.client.create_run(experiment_id, run_name=name, tags={Tag.ROLE: Role.SWEEP, **tags})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            self.client.log_artifacts(run.info.run_id, tmp)
        return run.info.run_id

    def sweep_run(self, experiment_id: str) -> str | None:
        """The sweep run of an experiment (the first one), or None."""
        runs = self.client.search_runs([experiment_id], f"tags.`{Tag.ROLE}` = '{Role.SWEEP}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def reopen_sweep(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def end_sweep(self, run_id: str, status: str, summary: dict[str, float]) -> None:
        self.log_metrics(run_id, summary, step=0)
        self.client.set_terminated(run_id, status=status)

    # -- trials (child runs) ---------------------------------------------------------------------
    def start_trial(self, experiment_id: str, parent_id: str, run_name: str, config: dict, tags: dict[str, str]) -> str:
        """A trial's run under its sweep's, with the flattened config as params."""
        from mlflow.entities import Param

        tags = {Tag.PARENT: parent_id, Tag.ROLE: Role.TRIAL, **tags}
        run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, param_text(v)) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS_PER_CALL):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_PER_CALL])
        return run_id

    def log_metrics(self, run_id: str, values: dict[str, float | None], step: int = 0) -> None:
        """Log ``values`` (None skipped) on a run at ``step``, in as few calls as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items() if value is not None]
        for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_CALL])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_step(self, run_id: str, step: int, tasks: list[str] | tuple[str, ...], rows: dict[str, list]) -> None:
        """Metrics after step ``step``: averages over seen tasks and each seen task's value."""
        values: dict[str, float | None] = {}
        for metric in METRICS:
            row = rows[metric]
            values[metric] = seen_averages(row)
            for name, value in zip(tasks, row):
                if value is not None:
                    values[f"task.{name}.{metric}"] = value
        self.log_metrics(run_id, values, step)

    def log_result(self, run_id: str, record: TrialRecord, artifacts: dict[str, bytes]) -> None:
        """Final metrics, tags that need the run's outcome (``log_outcome``), then the files (``log_files``)."""
        self.log_outcome(run_id, record)
        self.log_files(run_id, record, artifacts)

    def log_outcome(self, run_id: str, record: TrialRecord) -> None:
        """Final metrics, per-step update costs and the tags that need the run's outcome: no file is written."""
        self.log_metrics(run_id, record.final_metrics(), step=len(record.tasks) - 1)
        for step in record.steps:  # what each update cost, over the stream
            costs = {"step_update_seconds": step.train_seconds, "step_update_peak_mb": step.update_peak_mb}
            self.log_metrics(run_id, costs | {"step_update_state_mb": step.update_state_mb}, step=step.step)
        self.set_tags(run_id, {Tag.PRETRAINED: str(record.pretrained).lower(), Tag.SCHEMA: str(record.schema)})

    def log_files(self, run_id: str, record: TrialRecord, artifacts: dict[str, bytes]) -> None:
        """The run's artifacts: the record (result.json), its config, the matrices as CSV and the extras."""
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / RECORD_FILE).write_text(record.to_text())
            (root / "config.yaml").write_text(yaml.safe_dump(record.config, sort_keys=False))
            (root / "matrices").mkdir()
            threshold_matrices = (record.thresholds or {}).get("matrices", {})
            for metric in [*record.matrices, *threshold_matrices]:
                (root / "matrices" / f"{metric}.csv").write_text(record.matrix_csv(metric))
            for relative, data in artifacts.items():
                path = root / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            self.client.log_artifacts(run_id, tmp)

    def store_detector(self, run_id: str, data: bytes) -> None:
        """Keep a trial's fitted detector in its run, so it can be exported without training again.

        The tag ``cvad.detector=stored`` is set after the upload: it never names a run without the file.
        """
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / DETECTOR_ARTIFACT
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path))
        self.client.set_tag(run_id, Tag.DETECTOR, "stored")

    def log_stream(self, run_id: str, stream: TaskStream) -> None:
        """The trial's task stream as an MLflow dataset input (the runs table's Dataset column, filterable)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=stream.name, digest=stream.digest, source_type="local", source=stream.source, profile=stream.profile()
        )
        context = InputTag("mlflow.data.context", "training")
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[context])])

    def end_pruned(self, run_id: str, reason: str, price: dict[str, float]) -> None:
        """Close a trial priced over the sweep's budget and never trained: its price as metrics, and the MLflow UI's
        description saying so (the run's name starts with "pruned:"; tag ``cvad.pruned`` has the reason).

        MLflow has no "pruned" status; FINISHED with those marks, never in a recommendation or on a front.
        """
        self.log_metrics(run_id, price)
        note = f"Pruned before training: {reason}. Never trained: its metrics are the price cvad cost computed."
        self.set_tags(run_id, {"mlflow.note.content": note})
        self.client.set_terminated(run_id, status="FINISHED")

    def end_trial(self, run_id: str, status: str, error: str | None = None, details: str | None = None) -> None:
        """Close a trial's run; a failure keeps its one-line error as a tag and the full text as error.txt."""
        if error is not None:
            self.set_tags(run_id, {Tag.ERROR: error[:4900]})
            self.client.log_text(run_id, details or error, "error.txt")
        self.client.set_terminated(run_id, status=status)

    # -- reading ---------------------------------------------------------------------------------
    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def record(self, run_id: str) -> TrialRecord | None:
        """The result record a run holds (its result.json), or None when it has none."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                return TrialRecord.read(Path(self.client.download_artifacts(run_id, RECORD_FILE, tmp)))
        except Exception:  # a run or artifact that is gone
            return None

    def finished_record(self, run_id: str) -> TrialRecord | None:
        """The result record of a FINISHED trial run; None for any other run."""
        try:
            if self.client.get_run(run_id).info.status != "FINISHED":
                return None
        except Exception:  # a run that is gone: the trial reruns
            return None
        return self.record(run_id)

    def download(self, run_id: str, path: str, destination: str | Path) -> Path:
        """One artifact of a run, downloaded into ``destination``."""
        return Path(self.client.download_artifacts(run_id, path, str(destination)))

    def artifact_paths(self, run_id: str, folder: str) -> list[str]:
        return [a.path for a in self.client.list_artifacts(run_id, folder)]

    def metric_history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """(step, value) of a metric over a trial's steps."""
        return [(point.step, point.value) for point in self.client.get_metric_history(run_id, metric)]

    def trial_runs(self, experiments: list[str] | None = None) -> list[TrialRun]:
        """Every trial run of the named sweeps (default: all), failed ones included, each with its task stream."""
        names = self.experiments(experiments)
        if not names:
            return []
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                list(names), filter_string=f"tags.`{Tag.ROLE}` = '{Role.TRIAL}'", max_results=PAGE, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        return [self.trial_run(run, names) for run in runs]

    def trial_run(self, run: Any, names: dict[str, str]) -> TrialRun:
        tags, params = dict(run.data.tags), dict(run.data.params)
        return TrialRun(
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            sweep=names.get(run.info.experiment_id, ""),
            status=run.info.status,
            tags=tags,
            params=params,
            metrics=dict(run.data.metrics),
            stream=self.stream_of(run, tags, params),
            artifact_uri=run.info.artifact_uri,
        )

    def stream_of(self, run: Any, tags: dict[str, str], params: dict[str, str]) -> TaskStream:
        """A run's task stream: its dataset input, else the task list its params spell out, else its record's."""
        dataset = tags.get(Tag.DATASET) or params.get("dataset.name", "")
        root = params.get("dataset.root")
        root = None if root in (None, "None") else root
        for item in getattr(run.inputs, "dataset_inputs", None) or []:
            profile = json.loads(item.dataset.profile or "{}")
            if "tasks" in profile:
                tasks = tuple(profile["tasks"])
                return TaskStream(dataset, root, tasks, item.dataset.digest, item.dataset.source, profile.get("images"))
        tasks = param_value(params.get("dataset.tasks", "all"))
        if tasks == "all" and dataset == "builtin":
            tasks = param_value(params.get("dataset.builtin.categories", "None"))
        if not isinstance(tasks, list):
            tasks = self.recorded_tasks(run, tags)
        return TaskStream(dataset, root, None if tasks is None else tuple(tasks))

    def recorded_tasks(self, run: Any, tags: dict[str, str]) -> list[str] | None:
        """The tasks in a run's result.json (for 'all' on a folder, a preset, runs of older versions)."""
        from mlflow.artifacts import download_artifacts

        if Tag.PRETRAINED not in tags:  # set with the record: none was logged (pruned, failed)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:  # by the artifact URI: a few ms, where a download by run id looks the run up again
                uri = f"{run.info.artifact_uri}/{RECORD_FILE}"
                path = download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=self.uri)
            except Exception:  # a record whose artifacts are gone
                return None
            return TrialRecord.read(Path(path)).tasks

    # -- exports ---------------------------------------------------------------------------------
    def model_versions(self, name: str) -> list[ModelVersion]:
        """Every version registered under ``name``, oldest first (none when the model is not registered)."""
        found = self.client.search_model_versions(f"name = '{name}'")
        versions = [ModelVersion(int(v.version), dict(v.tags), v.run_id, v.creation_timestamp) for v in found]
        return sorted(versions, key=lambda v: v.version)

    def registered_models(self) -> list[str]:
        return sorted(model.name for model in self.client.search_registered_models())

    def export_run(self, record: TrialRecord | None) -> str:
        """A run in ``cvad-exports`` for a ``cvad run`` folder, holding its record's final metrics and budget."""
        found = self.client.get_experiment_by_name(EXPORTS_EXPERIMENT)
        experiment = found.experiment_id if found else self.client.create_experiment(EXPORTS_EXPERIMENT)
        run_id = self.client.create_run(experiment, tags={Tag.ROLE: Role.EXPORT}).info.run_id
        if record is not None:
            self.log_metrics(run_id, record.final | record.final_metrics())  # quality, budget and update cost
        self.client.set_terminated(run_id)
        return run_id
