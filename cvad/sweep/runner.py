"""The sweep driver: Optuna decides (``study``), Ray runs (``executor``), MLflow records (``cvad.tracking``).

The loop asks the study for a trial, turns its parameters into a run config, prices it (a
configuration over the constraints is pruned, never run), starts its MLflow run and hands it
to the executor; a finished trial's record is written to MLflow first and told to Optuna
after, so a driver killed in between leaves a FINISHED run that ``--resume`` reads back.

Before the study, the MLflow experiment or Ray exist, the driver lists every dataset section's
task stream once (``check_data``): a dataset that cannot be read stops the sweep with nothing
created. The concrete task lists found there (``tasks: all`` and presets resolved) are pinned in
the study and written into every trial's ``dataset.tasks``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial

import cvad
from cvad.catalog import config_name
from cvad.config import ConfigError, RunConfig
from cvad.data import DatasetError, load_task_stream
from cvad.detector import DETECTOR_FILE
from cvad.record import RESULT_SCHEMA
from cvad.stream import TaskStream, section_key
from cvad.sweep.detectors import DetectorKeeper
from cvad.sweep.executor import RayExecutor, error_text
from cvad.sweep.spec import SweepSpec, describe_dataset, objective_values
from cvad.sweep.study import Ending, SweepError, SweepStudy, TrialAttrs, params_key, set_constraints
from cvad.tracking import Tag, TrackingStore, resolve_tracking_uri, trial_tags

if TYPE_CHECKING:
    from ray import ObjectRef

    from cvad.sweep.worker import TrialOutput

MAX_CONSECUTIVE_DUPLICATES = 50

__all__ = ["SweepError", "SweepOptions", "SweepOutcome", "SweepRunner"]


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
    errors: list[tuple[str, int]] = field(default_factory=list)  # the failed trials' errors, most common first

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


@dataclass
class RunningTrial:
    """A trial handed to Ray, with its MLflow run."""

    trial: optuna.Trial
    run_id: str
    config: RunConfig
    started: float  # time.perf_counter() when submitted


@dataclass
class TrialOutcome:
    """A finished trial: what the worker returned, or its error."""

    running: RunningTrial
    output: TrialOutput | None  # None if it raised
    error: str | None = None  # the root error, one line
    details: str | None = None  # the error's full text


class SweepRunner:
    """Runs one sweep to its trial budget; ``printer`` receives progress lines."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, printer: Callable[[str], None] = print) -> None:
        self.spec, self.options, self.say = spec, options, printer
        self.started = time.perf_counter()
        self.remaining = 0  # trials this session submits at most
        self.submitted = 0
        self.duplicates = 0  # consecutive proposals of configurations that already ran
        self.running: dict[ObjectRef, RunningTrial] = {}
        self.step_seen: dict[int, str] = {}  # trial number -> worker that reported its steps
        self.steps_logged: dict[int, set[int]] = {}  # trial number -> steps already logged live
        self.pending: list[TrialOutcome] = []  # concluded trials whose recording is still to do
        self.prices: dict[str, dict] = {}  # run config (JSON) -> its efficiency, priced before training
        self.timings: dict[str, float] = {}
        self.tasks: dict[str, list[str]] = {}  # section_key -> the category list pinned for the whole sweep
        self.streams: dict[TaskStream, TaskStream] = {}  # each listed stream (it is its own key)

    # -- set-up ------------------------------------------------------------------------------
    def check_data(self) -> dict[str, list[str]]:
        """List every dataset section's task stream once, before anything is created or started.

        Each distinct dataset section of the configurations the spec validated (grid points or the
        ranges' ends) is read as a trial would list it; a ``DatasetError`` stops the sweep here.
        Returns the concrete task list of each section, keyed by ``section_key``.
        """
        started = time.perf_counter()
        sections = list(self.spec.datasets.values())
        tasks: dict[str, list[str]] = {}
        for section in sections:
            try:
                stream = load_task_stream(section.config, progress=self.say)
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
            tasks.setdefault(section_key(section.config), list(stream.tasks))
            self.streams.setdefault(stream, stream)
        if any(section.config.declared_task_count() is None for section in sections):
            # Validated again with the task counts now known: e.g. a bank too small for one entry per
            # task of a folder's "all".
            self.spec.check_configs(tasks)
        self.timings["data_check"] = time.perf_counter() - started
        return tasks

    def artifact_root(self) -> Path | None:
        uri = self.options.resolved_tracking_uri()
        return self.options.store_dir / "artifacts" if uri.startswith("sqlite:") or "://" not in uri else None

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SweepOutcome:
        spec, settings = self.spec, self.spec.settings
        tasks = self.check_data()  # before the study, the MLflow experiment and Ray exist
        self.options.store_dir.mkdir(parents=True, exist_ok=True)  # Optuna's sqlite file, even with a remote MLflow
        started = time.perf_counter()
        self.store = TrackingStore(self.options.resolved_tracking_uri())
        self.experiment = self.store.open_experiment(spec.name, artifact_root=self.artifact_root())
        self.study = SweepStudy.open(spec, self.options.resolved_storage(), self.options.resume)
        self.tasks = self.study.pin_tasks(tasks)
        self.detectors = DetectorKeeper(settings.detectors, self.options.store_dir, self.store, self.say)
        self.parent = self.study.parent_run
        if self.parent is None:
            sweep_tags = {Tag.SWEEP: spec.name, Tag.SAMPLER: settings.sampler.name, Tag.VERSION: cvad.__version__}
            self.parent = self.study.parent_run = self.store.start_sweep(
                self.experiment, spec.name, spec.raw, sweep_tags
            )
        else:
            self.store.reopen_sweep(self.parent)
        self.study.recover_stale(self.store, self.say)
        self.remaining = self.study.queue_work(self.options.n_trials)
        self.timings["store_setup"] = time.perf_counter() - started
        self.say(
            f"sweep {spec.name}: {self.remaining} trial(s) to run ({settings.sampler.name}), "
            f"study {self.study.storage}, MLflow {self.store.uri} (experiment {spec.name})"
        )
        if self.remaining == 0:
            self.detectors.keep_front(self.study)
            self.store.end_sweep(self.parent, "FINISHED", {})
            return self.outcome(interrupted=False)
        self.executor = RayExecutor(settings.resources, settings.feature_cache, self.options.address, self.say)
        self.timings |= self.executor.timings
        try:
            while self.submitted < self.remaining or self.running:
                self.fill()
                self.collect()
                if not self.has_room():  # freed slots get new trials before MLflow logging runs
                    self.flush()
        except KeyboardInterrupt:
            self.interrupt()
            return self.outcome(interrupted=True)
        self.detectors.keep_front(self.study)
        outcome = self.outcome(interrupted=False)
        summary = {"trials_completed": outcome.completed, "trials_failed": outcome.failed}
        self.store.end_sweep(self.parent, "FINISHED", summary)
        return outcome

    def has_room(self) -> bool:
        """Whether a trial is still to submit and the cluster can run it now."""
        return self.submitted < self.remaining and len(self.running) < self.executor.capacity()

    def fill(self) -> None:
        """Ask Optuna for trials and submit them while the cluster has room."""
        while self.has_room():
            trial = self.study.study.ask()
            if self.finish_duplicate(trial):
                self.duplicates += 1
                if self.duplicates >= MAX_CONSECUTIVE_DUPLICATES:
                    self.say("the sampler keeps proposing configurations that already ran: the space is exhausted")
                    self.remaining = self.submitted
                continue
            self.duplicates = 0
            self.submitted += 1
            self.submit(trial)

    def collect(self) -> None:
        """Wait briefly for a trial to finish, log the steps workers reported, take in the finished trials."""
        ready = self.executor.wait(list(self.running))
        self.log_reports()
        self.pending += [self.conclude(ref) for ref in ready]

    def flush(self) -> None:
        """Record the concluded trials (MLflow, then Optuna), then say where the sweep stands."""
        if not self.pending:
            return
        for outcome in self.pending:
            self.record(outcome)
        self.pending.clear()
        self.report()

    def finish_duplicate(self, trial: optuna.Trial) -> bool:
        """A sampler may propose a configuration that already ran: reuse its values, run nothing."""
        try:
            self.spec.config_for(trial, self.tasks)
        except ConfigError:
            return False  # submit() records the error
        other = self.study.same_as_finished(trial)
        if other is None:
            return False
        TrialAttrs().write(trial, duplicate_of=other.number)
        set_constraints(trial, other.constraints)
        self.study.study.tell(trial, other.values)
        return True

    def submit(self, trial: optuna.Trial) -> None:
        """Start ``trial``'s MLflow run and hand it to Ray, or end it here if its config is invalid or over budget."""
        try:
            config = self.spec.config_for(trial, self.tasks)
        except ConfigError as exc:
            self.study.tell_failure(trial, str(exc))
            self.say(f"trial {trial.number} FAILED before running: {exc}")
            return
        if self.spec.settings.resources.gpus_per_trial > 0 and config.device == "cpu":
            config = config.model_copy(update={"device": "cuda"})
        over_budget = self.over_budget(config)
        label = config_name(config.to_dict())
        tags = trial_tags(config.to_dict(), self.spec.name, trial.number)
        if over_budget:
            tags |= {Tag.PRUNED: over_budget, Tag.SCHEMA: str(RESULT_SCHEMA)}
        run_id = self.store.start_trial(
            self.experiment, self.parent, f"{trial.number:03d} {label}", config.to_dict(), tags
        )
        attrs = TrialAttrs().write(trial, run_id=run_id, label=label)
        root = None if config.dataset.root is None else str(config.dataset.root)
        stream = self.streams.get(TaskStream(config.dataset.name, root, tuple(config.dataset.tasks)))
        if stream is not None:
            self.store.log_stream(run_id, stream)
        if over_budget:
            price = self.prices[params_key(config.to_dict())]
            attrs.write(trial, pruned=over_budget)
            set_constraints(trial, self.spec.settings.constraints.values(price))
            self.study.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.store.log_metrics(run_id, {k: price[k] for k in ("memory_mb", "memory_bytes", "gflops", "gmacs")})
            self.store.end_trial(run_id, "FINISHED")
            self.say(f"[{self.elapsed()}] trial {trial.number} pruned before training ({label}): {over_budget}")
            return
        ref = self.executor.launch(config.to_dict(), trial.number)
        self.running[ref] = RunningTrial(trial, run_id, config, time.perf_counter())
        self.say(f"[{self.elapsed()}] trial {trial.number} started: {label}")

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
        reasons = constraints.violations(price)
        return ", ".join(reasons) + f" after {price['tasks']} tasks" if reasons else None

    def log_reports(self) -> None:
        """Log the steps workers reported to their trials' runs."""
        for report in self.executor.reports():
            running = next((r for r in self.running.values() if r.trial.number == report.number), None)
            if running is None:
                continue
            previous = self.step_seen.setdefault(report.number, report.worker)
            if previous != report.worker:  # Ray reran the trial elsewhere after losing its node
                self.store.set_tags(running.run_id, {Tag.RETRIED: "true"})
                self.step_seen[report.number] = report.worker
            self.store.log_step(running.run_id, report.step, report.tasks, report.rows)
            self.steps_logged.setdefault(report.number, set()).add(report.step)
            average = [v for v in report.rows["pixel_f1"] if v is not None]
            shown = f"{sum(average) / len(average):.3f}" if average else "-"
            self.say(
                f"[{self.elapsed()}] trial {report.number} step {report.step + 1}/{len(report.tasks)}: "
                f"pixel F1 (seen tasks) {shown}"
            )

    def conclude(self, ref: ObjectRef) -> TrialOutcome:
        """How a finished trial ended: its output (with defined objectives), or its error."""
        running = self.running.pop(ref)
        output = None
        try:
            output = self.executor.result(ref)
            objective_values(self.spec, output.record)
        except Exception as exc:  # the trial failed; the sweep goes on
            return TrialOutcome(running, output, error_text(exc), str(exc))
        return TrialOutcome(running, output)

    def record(self, outcome: TrialOutcome) -> None:
        """Log a concluded trial's results, artifacts and status to its MLflow run, then tell Optuna.

        In that order, so that a driver killed in between leaves a FINISHED run that
        ``recover_stale`` reads back, never an Optuna result without its record.
        """
        running, output = outcome.running, outcome.output
        number, run_id = running.trial.number, running.run_id
        seconds = time.perf_counter() - running.started
        detector = None
        if output is not None:
            artifacts = dict(output.artifacts)
            detector = artifacts.pop(DETECTOR_FILE, None)  # kept or not by sweep.detectors, below
            record = output.record
            self.store.set_tags(run_id, {Tag.WORKER: output.worker})
            for step in (s.step for s in record.steps):  # steps whose live report was lost
                if step not in self.steps_logged.get(number, set()):
                    self.store.log_step(run_id, step, record.tasks, record.row(step))
            self.store.log_result(run_id, record, artifacts)
        if outcome.error is not None:
            self.store.end_trial(run_id, "FAILED", outcome.error, outcome.details)
            self.study.tell_failure(running.trial, outcome.error)
            label = TrialAttrs.of(running.trial).label
            self.say(f"[{self.elapsed()}] trial {number} FAILED after {seconds:.0f}s ({label}): {outcome.error}")
            return
        if detector is not None:
            self.detectors.keep(run_id, detector)
        self.store.end_trial(run_id, "FINISHED")
        values = self.study.tell_record(running.trial, output.record)
        shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.spec.settings.objectives, values))
        weights = "" if output.record.pretrained else "  [RANDOM WEIGHTS]"
        self.say(f"[{self.elapsed()}] trial {number} done in {seconds:.0f}s: {shown}{weights}")

    def interrupt(self) -> None:
        """Ctrl-C: log what finished, cancel the running trials and mark them interrupted."""
        for outcome in self.pending:
            self.record(outcome)
        for ref, running in list(self.running.items()):
            self.executor.cancel(ref)
            self.study.interrupt(running.trial)
            self.store.end_trial(running.run_id, "KILLED")
        self.running.clear()
        self.detectors.keep_front(self.study)
        self.store.end_sweep(self.parent, "KILLED", {})
        self.say(
            f"[{self.elapsed()}] interrupted: finished trials stay recorded; continue with "
            f"`cvad sweep {self.spec.source} --resume`"
        )

    # -- reporting ---------------------------------------------------------------------------
    def elapsed(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def report(self) -> None:
        counts = self.study.counts()
        line = (
            f"[{self.elapsed()}] {counts[Ending.COMPLETE] + counts[Ending.DUPLICATE]} done, "
            f"{counts[Ending.FAILED]} failed, {counts[Ending.PRUNED]} pruned (over budget), {len(self.running)} running"
        )
        best = self.study.best_trials()
        if best:
            top = best[0]
            first = self.spec.settings.objectives[0].metric
            line += f" | best {first} {top.values[0]:.4g}: trial {top.number} ({TrialAttrs.of(top).label or ''})"
            if len(best) > 1:
                line += f"; {len(best)} on the Pareto front"
        self.say(line)

    def outcome(self, interrupted: bool) -> SweepOutcome:
        failed = [t for t in self.study.trials() if TrialAttrs.of(t).error is not None]
        counts = self.study.counts()
        return SweepOutcome(
            study_name=self.spec.name,
            completed=counts[Ending.COMPLETE],
            failed=counts[Ending.FAILED],
            pruned=counts[Ending.PRUNED],
            interrupted=interrupted,
            best=self.study.best_trials(),
            errors=Counter(str(TrialAttrs.of(t).error) for t in failed).most_common(),
        )
