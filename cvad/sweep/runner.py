"""The sweep driver: Optuna decides, Ray runs, MLflow records.

Optuna's study (in a database) is the source of truth for what has run: the driver asks
it for a trial, turns the trial's parameters into a run config, runs ``run_trial`` in a
Ray worker and tells Optuna the objective values (or the failure). Each trial is an MLflow
child run of the sweep's parent run. A trial's state in the study decides what ``--resume``
does with it:

- COMPLETE: done, never run again;
- FAIL with an ``error`` attribute: the trial itself failed (an exception, NaN, out of
  memory); recorded, not rerun;
- PRUNED: priced before training (``cvad.cost``) and over the sweep's constraints; recorded
  with the reason and the price, never run;
- FAIL without one: interrupted (Ctrl-C, the driver killed); its parameters are queued again;
- RUNNING in a study no driver is working on: the driver died; marked interrupted on resume.

Before the study, the MLflow experiment or Ray exist, the driver lists every dataset section's
task stream once (``check_data``): a dataset that cannot be read stops the sweep with nothing
created. The concrete task lists found there (``tasks: all`` and presets resolved) are pinned in
the study (user attr ``tasks``) and written into every trial's ``dataset.tasks``; ``--resume``
refuses a dataset whose categories changed since (``pin_tasks``).

A trial's fitted detector (``detector.pt``) reaches the driver with its other files; ``sweep.detectors``
says which runs keep it. ``front`` stages it on the driver's disk (``store_dir/detectors/<run id>.pt``)
until the session ends (or is interrupted): the trials then on the Pareto front get theirs logged to their
runs, and every staged file of the sweep is deleted. A front only loses trials as trials are added, so a
file not kept then is never needed later; files a killed driver left staged are settled by ``--resume``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial, TrialState

import cvad
from cvad.config import ConfigError, DatasetConfig, RunConfig
from cvad.data import DatasetError, load_task_stream
from cvad.detector import DETECTOR_FILE
from cvad.pareto import pareto_front
from cvad.sweep.spec import SweepSpec, describe_dataset, objective_values, tasks_key
from cvad.tracking import DataInput, SweepTracker, resolve_tracking_uri
from cvad.trial import RESULT_SCHEMA, write_atomic

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.util.queue import Queue

    from cvad.sweep.worker import StepReport

PARENT_RUN_ATTR = "mlflow_parent_run_id"
TASKS_ATTR = "tasks"  # the study's pinned task lists: {tasks_key: [category, ...]}
MAX_CONSECUTIVE_DUPLICATES = 50


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says what to do."""


@dataclass
class SweepOptions:
    store_dir: Path = Path("runs")
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite in store_dir
    storage: str | None = None  # Optuna storage; default: CVAD_STUDY_STORAGE, else sqlite in store_dir
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS, else a local Ray
    resume: bool = False
    n_trials: int | None = None  # total finished trials to reach (default: the spec's, or the grid)

    def resolved_tracking_uri(self) -> str:
        return resolve_tracking_uri(self.tracking_uri, self.store_dir)

    def resolved_storage(self) -> str:
        default = f"sqlite:///{(self.store_dir / 'optuna.db').resolve()}"
        return self.storage or os.environ.get("CVAD_STUDY_STORAGE") or default


@dataclass
class SweepOutcome:
    study_name: str
    completed: int
    failed: int
    pruned: int
    interrupted: bool
    best: list[FrozenTrial] = field(default_factory=list)
    errors: list[tuple[str, int]] = field(
        default_factory=list
    )  # the failed trials' errors, most common first, with counts

    @property
    def all_failed(self) -> bool:
        """Trials failed and none completed: the sweep has no result."""
        return self.failed > 0 and self.completed == 0

    def failure_summary(self) -> str | None:
        """How many trials failed and their most common error, in words; None when none failed."""
        if not self.errors:
            return None
        error, hits = self.errors[0]
        if not self.all_failed:
            head = f"{self.failed} of {self.failed + self.completed} trials failed"
        elif self.pruned:
            head = f"no trial completed: {self.failed} failed, {self.pruned} pruned before training"
        else:
            head = f"every trial failed ({self.failed})"
        others = f"; {len(self.errors) - 1} other error(s) in the rest" if len(self.errors) > 1 else ""
        return f"{head}; the most common error, in {hits} of them{others}:\n  {error}"


def describe(config: RunConfig) -> str:
    """A short human label of a configuration: method, backbone, strategy and the usual knobs."""
    strategy = config.strategy.name + (f" {config.strategy.replay_size}" if config.strategy.replay_size else "")
    params = config.model.params
    knobs = [f"{k}={params[k]}" for k in ("continual", "covariance", "bank_size") if k in params]
    return " ".join([config.model.name, *knobs, config.backbone.name, strategy])


def error_text(exc: BaseException) -> str:
    """The root error of a (possibly Ray-wrapped) exception, as ``Type: message``."""
    import ray.exceptions

    cause = exc
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        cause = exc.cause
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[-1] if message else ''}".strip()


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    settings = spec.settings
    constraints = None
    if settings.constraints.active:

        def constraints(trial: FrozenTrial) -> list[float]:
            return trial.user_attrs["constraints"]

    name, seed = settings.sampler.name, settings.sampler.seed
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=settings.sampler.startup_trials, constraints_func=constraints
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=settings.sampler.population_size, constraints_func=constraints
        )
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued, the sampler only breaks ties


def stream_key(dataset: DatasetConfig, tasks: Sequence[str]) -> str:
    """A task stream once its task list is concrete: the dataset's source and the categories in order."""
    return json.dumps([dataset.name, None if dataset.root is None else str(dataset.root), list(tasks)])


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


@dataclass
class RunningTrial:
    """A trial handed to Ray, with its MLflow run."""

    trial: optuna.Trial
    run_id: str
    config: RunConfig
    started: float  # time.perf_counter() when submitted


@dataclass
class TrialOutcome:
    """A finished trial, told to Optuna; ``record`` logs it to its MLflow run."""

    running: RunningTrial
    output: dict | None  # what the worker returned (record, artifacts, worker); None if it raised
    values: list[float] | None  # the objective values; None if the trial failed
    error: str | None = None  # the root error, one line
    details: str | None = None  # the error's full text


@dataclass
class Session:
    """What the loop of one driver session works with: the study, the sweep's MLflow run and Ray."""

    study: optuna.Study
    tracker: SweepTracker
    parent: str  # the sweep's MLflow run id
    ray: ModuleType
    launch: Callable[..., ObjectRef]  # runs run_trial_remote in a worker with a trial's resources
    events: Queue  # the workers' StepReports


class SweepRunner:
    """Runs one sweep to its trial budget; ``printer`` receives progress lines."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, printer: Callable[[str], None] = print) -> None:
        self.spec = spec
        self.options = options
        self.say = printer
        self.started = time.perf_counter()
        self.remaining = 0  # trials this session submits at most
        self.submitted = 0
        self.duplicates = 0  # consecutive proposals of configurations that already ran
        self.running: dict[ObjectRef, RunningTrial] = {}
        self.step_seen: dict[int, str] = {}  # trial number -> worker that reported its steps
        self.steps_logged: dict[int, set[int]] = {}  # trial number -> steps already logged live
        self.pending_logs: list[TrialOutcome] = []  # concluded trials whose MLflow logging is still to do
        self.prices: dict[str, dict] = {}  # run config (JSON) -> its efficiency, priced before training
        self.timings: dict[str, float] = {}
        self.tasks: dict[str, list[str]] = {}  # tasks_key -> the category list pinned for the whole sweep
        self.data_inputs: dict[str, DataInput] = {}  # stream_key -> what a trial logs as its MLflow dataset input

    # -- set-up ------------------------------------------------------------------------------
    def check_data(self) -> dict[str, list[str]]:
        """List every dataset section's task stream once, before anything is created or started.

        Each distinct dataset section of the configurations the spec validated (grid points or
        the ranges' ends) is read as a trial would list it (``load_task_stream``: folders, every
        image and mask header); a ``DatasetError`` stops the sweep here. Returns the concrete
        task list of each section (``all`` and presets resolved), keyed by ``tasks_key``.
        """
        started = time.perf_counter()
        sections = list(self.spec.datasets.values())
        tasks: dict[str, list[str]] = {}
        for section in sections:
            try:
                splits = load_task_stream(section.config, progress=self.say)
            except DatasetError as exc:
                used = ""
                if len(sections) > 1:
                    chosen = ", ".join(f"{k}={v}" for k, v in section.point.items())
                    used = f" (used by {section.points} configuration(s), e.g. {chosen})"
                raise SweepError(
                    f"{self.spec.source}: the dataset section {describe_dataset(section.config)}{used} "
                    f"cannot be read: {exc}\n"
                    f"nothing was started or recorded for sweep {self.spec.name!r}: "
                    "fix the dataset section (or the space) and run it again"
                ) from None
            key = tasks_key(section.config)
            tasks.setdefault(key, [split.name for split in splits])
            data = DataInput.of(section.config, splits)
            self.data_inputs.setdefault(stream_key(section.config, data.tasks), data)
        if any(section.config.declared_task_count() is None for section in sections):
            # Validated again with the task counts now known: e.g. a bank too small for one entry per
            # task of a folder's "all".
            self.spec.check_configs(tasks)
        self.timings["data_check"] = time.perf_counter() - started
        return tasks

    def pin_tasks(self, study: optuna.Study, created: bool) -> None:
        """Store the resolved task lists in a new study; on resume, refuse lists that changed since the start."""
        storage = self.options.resolved_storage()
        pinned = study.user_attrs.get(TASKS_ATTR)
        if created or pinned is None:  # a study from before pinning: its lists start now
            study.set_user_attr(TASKS_ATTR, self.tasks)
            return
        for key, names in self.tasks.items():
            before = pinned.get(key)
            if before is None or before == names:
                continue
            added = [n for n in names if n not in before]
            removed = [n for n in before if n not in names]
            change = "; ".join(
                part
                for part in (
                    f"added: {', '.join(added)}" if added else "",
                    f"removed: {', '.join(removed)}" if removed else "",
                    "the order changed" if not added and not removed else "",
                )
                if part
            )
            raise SweepError(
                f"sweep {self.spec.name!r} in {storage} runs dataset {describe_dataset(json.loads(key))} "
                f"on the categories {', '.join(before)}, pinned when it started; the dataset now has "
                f"{', '.join(names)} ({change}). Trials of one sweep must run on the same tasks: start a new "
                f"sweep name (--set sweep.name={self.spec.name}-2) to use the new categories, or restore the "
                "dataset folder to resume this one"
            )
        if any(key not in pinned for key in self.tasks):
            study.set_user_attr(TASKS_ATTR, {**self.tasks, **pinned})
        self.tasks = {key: pinned.get(key, names) for key, names in self.tasks.items()}

    def config_of(self, trial) -> RunConfig:
        """A trial's run config, on the sweep's pinned task lists."""
        return self.spec.config_for(trial, self.tasks)

    def open_study(self) -> optuna.Study:
        storage = self.options.resolved_storage()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = optuna.study.get_all_study_names(storage)
        exists = self.spec.name in names
        if exists and not self.options.resume:
            raise SweepError(
                f"sweep {self.spec.name!r} already exists in {storage}; pass --resume to continue it, "
                f"or --set sweep.name={self.spec.name}-2 to start another"
            )
        if self.options.resume and not exists:
            raise SweepError(f"nothing to resume: no sweep {self.spec.name!r} in {storage}")
        sampler = make_sampler(self.spec)
        if not exists:
            study = optuna.create_study(
                study_name=self.spec.name, storage=storage, directions=self.spec.directions, sampler=sampler
            )
            study.set_user_attr("spec", self.spec.stored_form())
            self.pin_tasks(study, created=True)
            return study
        study = optuna.load_study(study_name=self.spec.name, storage=storage, sampler=sampler)
        if study.user_attrs.get("spec") != self.spec.stored_form():
            raise SweepError(
                f"sweep {self.spec.name!r} in {storage} was started from a different sweep file or --set values; "
                "resume with the same ones (only --n-trials may change), or start a new sweep name"
            )
        self.pin_tasks(study, created=False)
        return study

    def recover_stale(self, study: optuna.Study, tracker: SweepTracker) -> None:
        """Trials left RUNNING by a driver that died (even by SIGKILL).

        MLflow is written before Optuna is told, so a run already FINISHED holds the whole record:
        Optuna gets its values from it and nothing reruns. Any other is marked interrupted (its
        run KILLED) and reruns.
        """
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            run_id = trial.user_attrs.get("mlflow_run_id")
            record = tracker.finished_record(run_id) if run_id else None
            if record is not None:
                self.tell(study, optuna.Trial(study, trial._trial_id), record)
                self.say(
                    f"trial {trial.number} finished in an earlier session just before it stopped: its record is kept"
                )
                continue
            study.tell(trial.number, state=TrialState.FAIL)
            if run_id:
                tracker.end_trial(run_id, "KILLED")
            self.say(f"trial {trial.number} was interrupted in an earlier session: it will be rerun")

    def queue_work(self, study: optuna.Study) -> int:
        """Enqueue what must (re)run; return how many trials this session may still finish."""
        trials = study.get_trials(deepcopy=False)
        finished = [
            t
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not is_interrupted(t))
        ]
        done = {params_key(t.params) for t in finished}
        # An enqueued trial has no params yet: Optuna keeps them as its "fixed_params".
        waiting = {params_key(t.system_attrs.get("fixed_params", {})) for t in trials if t.state == TrialState.WAITING}
        if self.spec.grid_points is not None:
            wanted = self.spec.grid_points
        else:
            wanted = [t.params for t in trials if is_interrupted(t)]
        for params in wanted:
            key = params_key(params)
            if key not in done and key not in waiting:
                study.enqueue_trial(params)
                waiting.add(key)
        unique_finished = len([t for t in finished if "duplicate_of" not in t.user_attrs])
        remaining = self.spec.n_trials(self.options.n_trials) - unique_finished
        if self.spec.grid_points is not None:
            remaining = min(remaining, len(waiting))
        return max(0, remaining)

    def start_ray(self):
        """Join the Ray cluster (or start a local one) and warm one worker per trial slot."""
        import ray

        started = time.perf_counter()
        if not ray.is_initialized():
            address = self.options.address or os.environ.get("RAY_ADDRESS")
            kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            if address:
                try:
                    ray.init(address=address, **kwargs)
                except ConnectionError as exc:
                    raise SweepError(
                        f"cannot join the Ray cluster at {address} ({exc}); start it (ray start --head), check "
                        "RAY_AUTH_TOKEN, or drop --address / RAY_ADDRESS to run on this machine"
                    ) from None
            else:
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)  # never a cluster left running here
        self.timings["ray_start"] = time.perf_counter() - started
        resources = ray.cluster_resources()
        self.say(f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        started = time.perf_counter()
        # Workers import torch and cvad once, here, rather than inside the first trials' time.
        warm = ray.remote(import_trial_code).options(num_cpus=self.spec.settings.resources.cpus_per_trial)
        ray.get([warm.remote() for _ in range(self.capacity(ray))])
        self.timings["workers_ready"] = time.perf_counter() - started
        return ray

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SweepOutcome:
        spec, settings = self.spec, self.spec.settings
        self.tasks = self.check_data()  # before the study, the MLflow experiment and Ray exist
        self.options.store_dir.mkdir(parents=True, exist_ok=True)  # Optuna's sqlite file, even with a remote MLflow
        started = time.perf_counter()
        tracker = SweepTracker(self.options.resolved_tracking_uri(), spec.name, artifact_root=self.artifact_root())
        study = self.open_study()
        parent = study.user_attrs.get(PARENT_RUN_ATTR)
        if parent is None:
            tags = {"cvad.sweep": spec.name, "cvad.sampler": settings.sampler.name, "cvad.version": cvad.__version__}
            parent = tracker.start_sweep(spec.name, spec.raw, tags)
            study.set_user_attr(PARENT_RUN_ATTR, parent)
        else:
            tracker.reopen_sweep(parent)
        self.recover_stale(study, tracker)
        self.remaining = self.queue_work(study)
        self.timings["store_setup"] = time.perf_counter() - started
        self.say(
            f"sweep {spec.name}: {self.remaining} trial(s) to run ({settings.sampler.name}), "
            f"study {self.options.resolved_storage()}, "
            f"MLflow {tracker.uri} (experiment {spec.name})"
        )
        if self.remaining == 0:
            self.keep_front_detectors(study, tracker)
            tracker.end_sweep(parent, "FINISHED", {})
            return self.outcome(study, interrupted=False)

        session = self.start_session(study, tracker, parent)
        try:
            while self.submitted < self.remaining or self.running:
                self.fill(session)
                self.collect(session)
                if not self.has_room(session):  # freed slots get new trials before MLflow logging runs
                    self.flush(session)
        except KeyboardInterrupt:
            self.interrupt(session)
            return self.outcome(study, interrupted=True)
        self.keep_front_detectors(study, tracker)
        outcome = self.outcome(study, interrupted=False)
        tracker.end_sweep(parent, "FINISHED", {"trials_completed": outcome.completed, "trials_failed": outcome.failed})
        return outcome

    def start_session(self, study: optuna.Study, tracker: SweepTracker, parent: str) -> Session:
        """Start Ray and the workers' progress queue."""
        ray = self.start_ray()
        events = self.progress_queue(ray)
        resources = self.spec.settings.resources
        remote = ray.remote(run_trial_remote).options(
            num_cpus=resources.cpus_per_trial,
            num_gpus=resources.gpus_per_trial,
            max_retries=1,  # a lost node reruns its trial once elsewhere; exceptions are not retried
            retry_exceptions=False,
        )
        return Session(study, tracker, parent, ray, remote.remote, events)

    def has_room(self, session: Session) -> bool:
        """Whether a trial is still to submit and the cluster can run it now."""
        return self.submitted < self.remaining and len(self.running) < self.capacity(session.ray)

    def fill(self, session: Session) -> None:
        """Ask Optuna for trials and submit them while the cluster has room."""
        while self.has_room(session):
            trial = session.study.ask()
            if self.finish_duplicate(session.study, trial):
                self.duplicates += 1
                if self.duplicates >= MAX_CONSECUTIVE_DUPLICATES:
                    self.say("the sampler keeps proposing configurations that already ran: the space is exhausted")
                    self.remaining = self.submitted
                continue
            self.duplicates = 0
            self.submitted += 1
            self.submit(session, trial)

    def collect(self, session: Session) -> None:
        """Wait briefly for a trial to finish, log the steps workers reported, take in the finished trials' outcomes."""
        ready, _ = session.ray.wait(list(self.running), num_returns=1, timeout=0.5)
        self.drain(session)
        self.pending_logs += [self.conclude(session, ref) for ref in ready]

    def flush(self, session: Session) -> None:
        """Record the concluded trials (MLflow, then Optuna), then say where the sweep stands."""
        if not self.pending_logs:
            return
        for outcome in self.pending_logs:
            self.record(session, outcome)
        self.pending_logs.clear()
        self.report(session.study)

    def capacity(self, ray: ModuleType) -> int:
        """Trials that can run at once: submitting more would only queue them inside Ray."""
        resources = self.spec.settings.resources
        available = ray.cluster_resources()
        fits = int(available.get("CPU", 0) // resources.cpus_per_trial)
        if resources.gpus_per_trial > 0:
            fits = min(fits, int(available.get("GPU", 0) // resources.gpus_per_trial))
        return max(1, min(fits, resources.max_concurrent or fits))

    def artifact_root(self) -> Path | None:
        uri = self.options.resolved_tracking_uri()
        return self.options.store_dir / "artifacts" if uri.startswith("sqlite:") or "://" not in uri else None

    def finish_duplicate(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """A sampler may propose a configuration that already ran: reuse its values, run nothing."""
        try:
            self.config_of(trial)
        except ConfigError:
            return False  # submit() records the error
        key = params_key(trial.params)
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if params_key(other.params) == key and "duplicate_of" not in other.user_attrs:
                trial.set_user_attr("duplicate_of", other.number)
                for name in ("constraints",):
                    if name in other.user_attrs:
                        trial.set_user_attr(name, other.user_attrs[name])
                study.tell(trial, other.values)
                return True
        return False

    def submit(self, session: Session, trial: optuna.Trial) -> None:
        """Start ``trial``'s MLflow run and hand the trial to Ray, or end it here if its config is invalid
        or over budget."""
        study, tracker = session.study, session.tracker
        try:
            config = self.config_of(trial)
        except ConfigError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} FAILED before running: {exc}")
            return
        if self.spec.settings.resources.gpus_per_trial > 0 and config.device == "cpu":
            config = config.model_copy(update={"device": "cuda"})
        over_budget = self.over_budget(config)
        tags = {
            "cvad.sweep": self.spec.name,
            "cvad.trial": str(trial.number),
            "cvad.model": config.model.name,
            "cvad.backbone": config.backbone.name,
            "cvad.strategy": config.strategy.name,
            "cvad.dataset": config.dataset.name,
            "cvad.weights": config.backbone.weights,
            "cvad.seed": str(config.seed),
            "cvad.version": cvad.__version__,
        }
        if over_budget:
            tags |= {"cvad.pruned": over_budget, "cvad.schema": str(RESULT_SCHEMA)}
        run_id = tracker.start_trial(session.parent, f"{trial.number:03d} {describe(config)}", config.to_dict(), tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("label", describe(config))
        data_input = self.data_inputs.get(stream_key(config.dataset, config.dataset.tasks))
        if data_input is not None:
            tracker.log_dataset(run_id, data_input)
        if over_budget:
            price = self.prices[params_key(config.to_dict())]
            trial.set_user_attr("pruned", over_budget)
            trial.set_user_attr("constraints", self.spec.settings.constraints.values({"efficiency": price}))
            study.tell(trial, state=TrialState.PRUNED)
            priced = {k: price[k] for k in ("memory_mb", "memory_bytes", "gflops", "gmacs")}
            tracker.log_metrics(run_id, priced, step=0)
            tracker.end_trial(run_id, "FINISHED")
            self.say(
                f"[{self.elapsed()}] trial {trial.number} pruned before training ({describe(config)}): {over_budget}"
            )
            return
        threads = max(1, int(self.spec.settings.resources.cpus_per_trial))
        ref = session.launch(config.to_dict(), trial.number, session.events, threads, self.spec.settings.feature_cache)
        self.running[ref] = RunningTrial(trial, run_id, config, time.perf_counter())
        self.say(f"[{self.elapsed()}] trial {trial.number} started: {describe(config)}")

    def over_budget(self, config: RunConfig) -> str | None:
        """Why a configuration breaks the sweep's constraints, priced without data or training; None if it fits."""
        constraints = self.spec.settings.constraints
        if not constraints.active:
            return None
        from cvad.cost import price_config

        key = params_key(config.to_dict())
        if key not in self.prices:
            self.prices[key] = price_config(config)
        price = self.prices[key]
        reasons = constraints.violations({"efficiency": price})
        return ", ".join(reasons) + f" after {price['tasks']} tasks" if reasons else None

    @staticmethod
    def progress_queue(ray: ModuleType) -> Queue:
        """The workers' progress channel, kept on the driver's node so that losing a worker node spares it."""
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def drain(self, session: Session) -> None:
        """Log the steps workers reported; replace the progress queue if it was lost."""
        try:
            reports: list[StepReport] = session.events.get_nowait_batch(session.events.qsize())
        except session.ray.exceptions.RayActorError:
            self.say(
                f"[{self.elapsed()}] the progress channel was lost; "
                "running trials' per-step metrics come from their records"
            )
            session.events = self.progress_queue(session.ray)
            return
        for report in reports:
            running = next((r for r in self.running.values() if r.trial.number == report.number), None)
            if running is None:
                continue
            previous = self.step_seen.setdefault(report.number, report.worker)
            if previous != report.worker:  # Ray reran the trial elsewhere after losing its node
                session.tracker.mark_retried(running.run_id)
                self.step_seen[report.number] = report.worker
            session.tracker.log_step(running.run_id, report.step, report.tasks, report.rows)
            self.steps_logged.setdefault(report.number, set()).add(report.step)
            average = [v for v in report.rows["pixel_f1"] if v is not None]
            shown = f"{sum(average) / len(average):.3f}" if average else "-"
            self.say(
                f"[{self.elapsed()}] trial {report.number} step {report.step + 1}/{len(report.tasks)}: "
                f"pixel F1 (seen tasks) {shown}"
            )

    def conclude(self, session: Session, ref: ObjectRef) -> TrialOutcome:
        """How a finished trial ended: its output and objective values, or its error (``record`` stores it)."""
        running = self.running.pop(ref)
        output = None
        try:
            output = session.ray.get(ref)
            values = objective_values(self.spec, output["record"])
        except Exception as exc:  # the trial failed; the sweep goes on
            return TrialOutcome(running, output, None, error_text(exc), str(exc))
        return TrialOutcome(running, output, values)

    def tell(self, study: optuna.Study, trial: optuna.Trial, record: dict | None, error: str | None = None) -> None:
        """Tell Optuna how a trial ended: its record's objective values, or its error."""
        if record is None:
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            return
        if self.spec.settings.constraints.active:
            trial.set_user_attr("constraints", self.spec.settings.constraints.values(record))
        trial.set_user_attr("pretrained", bool(record["weights"]["pretrained"]))
        study.tell(trial, objective_values(self.spec, record))

    def record(self, session: Session, outcome: TrialOutcome) -> None:
        """Log a concluded trial's results, artifacts and status to its MLflow run, then tell Optuna.

        In that order, so that a driver killed in between leaves a FINISHED run that
        ``recover_stale`` reads back, never an Optuna result without its record.
        """
        tracker, running, output = session.tracker, outcome.running, outcome.output
        number, run_id = running.trial.number, running.run_id
        seconds = time.perf_counter() - running.started
        detector = None
        if output is not None:
            detector = output["artifacts"].pop(DETECTOR_FILE, None)  # kept or not by sweep.detectors, below
            record = output["record"]
            tracker.tag_worker(run_id, output["worker"])
            for step in (s.get("step") for s in record["steps"]):  # steps whose live report was lost
                if step not in self.steps_logged.get(number, set()):
                    tracker.log_step(
                        run_id, step, record["tasks"], {m: rows[step] for m, rows in record["matrices"].items()}
                    )
            tracker.log_result(run_id, record, output["artifacts"])
        if outcome.error is not None:
            tracker.end_trial(run_id, "FAILED", outcome.error, outcome.details)
            self.tell(session.study, running.trial, None, outcome.error)
            self.say(
                f"[{self.elapsed()}] trial {number} FAILED after {seconds:.0f}s ({describe(running.config)}): "
                f"{outcome.error}"
            )
            return
        if detector is not None:
            self.keep_detector(tracker, run_id, detector)
        tracker.end_trial(run_id, "FINISHED")
        self.tell(session.study, running.trial, output["record"])
        shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.spec.settings.objectives, outcome.values))
        weights = "" if output["record"]["weights"]["pretrained"] else "  [RANDOM WEIGHTS]"
        self.say(f"[{self.elapsed()}] trial {number} done in {seconds:.0f}s: {shown}{weights}")

    # -- fitted detectors ----------------------------------------------------------------------
    def staged_detector(self, run_id: str) -> Path:
        """Where ``front`` keeps a completed trial's detector until the session knows the final front."""
        return self.options.store_dir / "detectors" / f"{run_id}.pt"

    def keep_detector(self, tracker: SweepTracker, run_id: str, data: bytes) -> None:
        """Log a completed trial's detector now (``all``), stage it until the front is known (``front``), or drop it."""
        policy = self.spec.settings.detectors
        if policy == "all":
            tracker.store_detector(run_id, data)
        elif policy == "front":
            path = self.staged_detector(run_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)

    def keep_front_detectors(self, study: optuna.Study, tracker: SweepTracker) -> None:
        """Log the staged detectors of the trials on the Pareto front to their runs; delete the sweep's staged files.

        Only this study's runs' files are touched: other sweeps in the same store stage theirs beside them.
        """
        run_ids = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)} - {None}
        staged = {run_id: path for run_id in run_ids if (path := self.staged_detector(run_id)).is_file()}
        if not staged:
            return
        front = [t.user_attrs.get("mlflow_run_id") for t in best_trials(study, self.spec)]
        kept = [run_id for run_id in front if run_id in staged]
        for run_id in kept:
            tracker.store_detector(run_id, staged[run_id].read_bytes())
        for path in staged.values():
            path.unlink()
        if kept:
            self.say(
                f"kept the fitted detectors of {len(kept)} trial(s) on the Pareto front (detector.pt in their MLflow "
                "runs; export one with: cvad export RUN_ID --format onnx)"
            )

    def interrupt(self, session: Session) -> None:
        """Ctrl-C: log what finished, cancel the running trials and mark them interrupted."""
        for outcome in self.pending_logs:
            self.record(session, outcome)
        for ref, running in list(self.running.items()):
            session.ray.cancel(ref, force=True)
            running.trial.set_user_attr("interrupted", True)
            session.study.tell(running.trial, state=TrialState.FAIL)
            session.tracker.end_trial(running.run_id, "KILLED")
        self.running.clear()
        self.keep_front_detectors(session.study, session.tracker)
        session.tracker.end_sweep(session.parent, "KILLED", {})
        self.say(
            f"[{self.elapsed()}] interrupted: finished trials stay recorded; continue with "
            f"`cvad sweep {self.spec.source} --resume`"
        )

    # -- reporting ---------------------------------------------------------------------------
    def elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def report(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        failed = sum(t.state == TrialState.FAIL and not is_interrupted(t) for t in trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        line = (
            f"[{self.elapsed()}] {done} done, {failed} failed, {pruned} pruned (over budget), "
            f"{len(self.running)} running"
        )
        best = best_trials(study, self.spec)
        if best:
            first = self.spec.settings.objectives[0]
            top = best[0]
            line += (
                f" | best {first.metric} {top.values[0]:.4g}: trial {top.number} ({top.user_attrs.get('label', '')})"
            )
            if len(best) > 1:
                line += f"; {len(best)} on the Pareto front"
        self.say(line)

    def outcome(self, study: optuna.Study, interrupted: bool) -> SweepOutcome:
        trials = study.get_trials(deepcopy=False)
        failed = [t for t in trials if t.state == TrialState.FAIL and not is_interrupted(t)]
        return SweepOutcome(
            study_name=study.study_name,
            completed=sum(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in trials),
            failed=len(failed),
            pruned=sum(t.state == TrialState.PRUNED for t in trials),
            interrupted=interrupted,
            best=best_trials(study, self.spec),
            errors=Counter(str(t.user_attrs["error"]) for t in failed).most_common(),
        )


def best_trials(study: optuna.Study, spec: SweepSpec) -> list[FrozenTrial]:
    """Feasible Pareto-optimal trials (the best one for a single objective), best first objective first."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "duplicate_of" not in t.user_attrs and all(c <= 0 for c in t.user_attrs.get("constraints", []))
    ]
    maximize = [d == "maximize" for d in spec.directions]
    front = [complete[i] for i in pareto_front([t.values for t in complete], maximize)]
    return sorted(front, key=lambda t: (-t.values[0] if maximize[0] else t.values[0], t.number))


def import_trial_code() -> None:
    """Ray warm-up task: the imports every trial needs."""
    import cvad.sweep.worker  # noqa: F401


def run_trial_remote(config: dict, number: int, events: Queue, threads: int, feature_cache: bool) -> dict:
    """Ray entry point (module level so that workers import it by name)."""
    from cvad.sweep.worker import run_trial_for_sweep

    return run_trial_for_sweep(config, number, events, threads, feature_cache)
