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
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

import cvad
from cvad.config import ConfigError, RunConfig
from cvad.pareto import pareto_front
from cvad.sweep.spec import SweepSpec, objective_values
from cvad.tracking import SweepTracker, default_tracking_uri
from cvad.trial import RESULT_SCHEMA

PARENT_RUN_ATTR = "mlflow_parent_run_id"
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
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(self.store_dir)

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
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.sampler.startup_trials, constraints_func=constraints)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=settings.sampler.population_size, constraints_func=constraints)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued, the sampler only breaks ties


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class SweepRunner:
    """Runs one sweep to its trial budget; ``printer`` receives progress lines."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, printer: Callable[[str], None] = print) -> None:
        self.spec = spec
        self.options = options
        self.say = printer
        self.started = time.perf_counter()
        self.running: dict = {}  # Ray ObjectRef -> (optuna Trial, mlflow run id, RunConfig, start time)
        self.step_seen: dict[int, str] = {}  # trial number -> worker that reported its steps
        self.steps_logged: dict[int, set[int]] = {}  # trial number -> steps already logged live
        self.pending_logs: list[tuple] = []  # concluded trials whose MLflow logging is still to do
        self.prices: dict[str, dict] = {}  # run config (JSON) -> its efficiency, priced before training
        self.timings: dict[str, float] = {}

    # -- set-up ------------------------------------------------------------------------------
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
            study = optuna.create_study(study_name=self.spec.name, storage=storage, directions=self.spec.directions, sampler=sampler)
            study.set_user_attr("spec", self.spec.stored_form())
            return study
        study = optuna.load_study(study_name=self.spec.name, storage=storage, sampler=sampler)
        if study.user_attrs.get("spec") != self.spec.stored_form():
            raise SweepError(
                f"sweep {self.spec.name!r} in {storage} was started from a different sweep file or --set values; "
                "resume with the same ones (only --n-trials may change), or start a new sweep name"
            )
        return study

    def recover_stale(self, study: optuna.Study, tracker: SweepTracker) -> None:
        """Trials left RUNNING by a driver that died: mark them interrupted, their runs KILLED."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL)
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id:
                tracker.end_trial(run_id, "KILLED")
            self.say(f"trial {trial.number} was interrupted in an earlier session: it will be rerun")

    def queue_work(self, study: optuna.Study) -> int:
        """Enqueue what must (re)run; return how many trials this session may still finish."""
        trials = study.get_trials(deepcopy=False)
        finished = [
            t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and not is_interrupted(t))
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
                ray.init(address=address, **kwargs)
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
        remaining = self.queue_work(study)
        self.timings["store_setup"] = time.perf_counter() - started
        self.say(
            f"sweep {spec.name}: {remaining} trial(s) to run ({settings.sampler.name}), study {self.options.resolved_storage()}, "
            f"MLflow {tracker.uri} (experiment {spec.name})"
        )
        if remaining == 0:
            tracker.end_sweep(parent, "FINISHED", {})
            return self.outcome(study, interrupted=False)

        ray = self.start_ray()
        from ray.util.queue import Queue

        events = self.progress_queue(ray, Queue)
        remote = ray.remote(run_trial_remote).options(
            num_cpus=settings.resources.cpus_per_trial,
            num_gpus=settings.resources.gpus_per_trial,
            max_retries=1,  # a lost node reruns its trial once elsewhere; exceptions are not retried
            retry_exceptions=False,
        )
        threads = max(1, int(settings.resources.cpus_per_trial))
        submitted = duplicates = 0
        try:
            while submitted < remaining or self.running:
                while submitted < remaining and len(self.running) < self.capacity(ray):
                    trial = study.ask()
                    if self.finish_duplicate(study, trial):
                        duplicates += 1
                        if duplicates >= MAX_CONSECUTIVE_DUPLICATES:
                            self.say("the sampler keeps proposing configurations that already ran: the space is exhausted")
                            remaining = submitted
                        continue
                    duplicates = 0
                    submitted += 1
                    self.submit(study, trial, tracker, parent, remote, events, threads)
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
                events = self.drain(events, tracker, ray, Queue)
                # Optuna first, so that the freed slots get new trials before MLflow logging runs.
                self.pending_logs += [self.conclude(study, ref) for ref in ready]
                if submitted < remaining and len(self.running) < self.capacity(ray):
                    continue
                for entry in self.pending_logs:
                    self.record(tracker, *entry)
                if self.pending_logs:
                    self.pending_logs.clear()
                    self.report(study)
            for entry in self.pending_logs:
                self.record(tracker, *entry)
        except KeyboardInterrupt:
            self.interrupt(study, tracker, parent, ray)
            return self.outcome(study, interrupted=True)
        outcome = self.outcome(study, interrupted=False)
        tracker.end_sweep(parent, "FINISHED", {"trials_completed": outcome.completed, "trials_failed": outcome.failed})
        return outcome

    def capacity(self, ray) -> int:
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
            self.spec.config_for(trial)
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

    def submit(self, study, trial, tracker, parent, remote, events, threads) -> None:
        try:
            config = self.spec.config_for(trial)
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
        run_id = tracker.start_trial(parent, f"{trial.number:03d} {describe(config)}", config.to_dict(), tags)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("label", describe(config))
        if over_budget:
            price = self.prices[params_key(config.to_dict())]
            trial.set_user_attr("pruned", over_budget)
            trial.set_user_attr("constraints", self.spec.settings.constraints.values({"efficiency": price}))
            study.tell(trial, state=TrialState.PRUNED)
            priced = {k: price[k] for k in ("memory_mb", "memory_bytes", "gflops", "gmacs")}
            tracker.log_metrics(run_id, priced, step=0)
            tracker.end_trial(run_id, "FINISHED")
            self.say(f"[{self.elapsed()}] trial {trial.number} pruned before training ({describe(config)}): {over_budget}")
            return
        ref = remote.remote(config.to_dict(), trial.number, events, threads, self.spec.settings.feature_cache)
        self.running[ref] = (trial, run_id, config, time.perf_counter())
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
    def progress_queue(ray, queue_class):
        """The workers' progress channel, kept on the driver's node so that losing a worker node spares it."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return queue_class(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def drain(self, events, tracker: SweepTracker, ray, queue_class):
        """Log the steps workers reported; returns the queue to use next (a new one if it was lost)."""
        try:
            items = events.get_nowait_batch(events.qsize())
        except ray.exceptions.RayActorError:
            self.say(f"[{self.elapsed()}] the progress channel was lost; running trials' per-step metrics come from their records")
            return self.progress_queue(ray, queue_class)
        for kind, number, info in items:
            entry = next((e for e in self.running.values() if e[0].number == number), None)
            if entry is None or kind != "step":
                continue
            previous = self.step_seen.setdefault(number, info["worker"])
            if previous != info["worker"]:  # Ray reran the trial elsewhere after losing its node
                tracker.client.set_tag(entry[1], "cvad.retried", "true")
                self.step_seen[number] = info["worker"]
            tracker.log_step(entry[1], info["step"], info["tasks"], info["rows"])
            self.steps_logged.setdefault(number, set()).add(info["step"])
            average = [v for v in info["rows"]["pixel_f1"] if v is not None]
            shown = f"{sum(average) / len(average):.3f}" if average else "-"
            self.say(f"[{self.elapsed()}] trial {number} step {info['step'] + 1}/{len(info['tasks'])}: pixel F1 (seen tasks) {shown}")
        return events

    def conclude(self, study: optuna.Study, ref) -> tuple:
        """Tell Optuna how a finished trial ended; return what ``record`` logs to MLflow."""
        import ray

        trial, run_id, config, started = self.running.pop(ref)
        output = error = None
        try:
            output = ray.get(ref)
            values = objective_values(self.spec, output["record"])
        except Exception as exc:  # the trial failed; the sweep goes on
            error = (error_text(exc), str(exc))
            trial.set_user_attr("error", error[0])
            study.tell(trial, state=TrialState.FAIL)
            return trial, run_id, config, started, output, None, error
        record = output["record"]
        if self.spec.settings.constraints.active:
            trial.set_user_attr("constraints", self.spec.settings.constraints.values(record))
        trial.set_user_attr("pretrained", bool(record["weights"]["pretrained"]))
        study.tell(trial, values)
        return trial, run_id, config, started, output, values, None

    def record(self, tracker: SweepTracker, trial, run_id, config, started, output, values, error) -> None:
        """Log a concluded trial's results, artifacts and status to its MLflow run."""
        seconds = time.perf_counter() - started
        if output is not None:
            record = output["record"]
            tracker.client.set_tag(run_id, "cvad.worker", output["worker"])
            for step in (s.get("step") for s in record["steps"]):  # steps whose live report was lost
                if step not in self.steps_logged.get(trial.number, set()):
                    tracker.log_step(run_id, step, record["tasks"], {m: rows[step] for m, rows in record["matrices"].items()})
            tracker.log_result(run_id, record, output["artifacts"])
        if error is not None:
            message, details = error
            tracker.end_trial(run_id, "FAILED", message, details)
            self.say(f"[{self.elapsed()}] trial {trial.number} FAILED after {seconds:.0f}s ({describe(config)}): {message}")
            return
        tracker.end_trial(run_id, "FINISHED")
        shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.spec.settings.objectives, values))
        weights = "" if output["record"]["weights"]["pretrained"] else "  [RANDOM WEIGHTS]"
        self.say(f"[{self.elapsed()}] trial {trial.number} done in {seconds:.0f}s: {shown}{weights}")

    def interrupt(self, study, tracker, parent, ray) -> None:
        for entry in self.pending_logs:
            self.record(tracker, *entry)
        for ref, (trial, run_id, _, _) in list(self.running.items()):
            ray.cancel(ref, force=True)
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            tracker.end_trial(run_id, "KILLED")
        self.running.clear()
        tracker.end_sweep(parent, "KILLED", {})
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
        line = f"[{self.elapsed()}] {done} done, {failed} failed, {pruned} pruned (over budget), {len(self.running)} running"
        best = best_trials(study, self.spec)
        if best:
            first = self.spec.settings.objectives[0]
            top = best[0]
            line += f" | best {first.metric} {top.values[0]:.4g}: trial {top.number} ({top.user_attrs.get('label', '')})"
            if len(best) > 1:
                line += f"; {len(best)} on the Pareto front"
        self.say(line)

    def outcome(self, study: optuna.Study, interrupted: bool) -> SweepOutcome:
        trials = study.get_trials(deepcopy=False)
        return SweepOutcome(
            study_name=study.study_name,
            completed=sum(t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs for t in trials),
            failed=sum(t.state == TrialState.FAIL and not is_interrupted(t) for t in trials),
            pruned=sum(t.state == TrialState.PRUNED for t in trials),
            interrupted=interrupted,
            best=best_trials(study, self.spec),
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


def run_trial_remote(config: dict, number: int, events, threads: int, feature_cache: bool) -> dict:
    """Ray entry point (module level so that workers import it by name)."""
    from cvad.sweep.worker import run_trial_for_sweep

    return run_trial_for_sweep(config, number, events, threads, feature_cache)
