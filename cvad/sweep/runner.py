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
from cvad.sweep.hold import SweepHold
from cvad.sweep.reports import StepReport
from cvad.sweep.services import DEFAULT_WAIT, Patience, Patient, Service, ServiceLost, patient_storage, short_error
from cvad.sweep.spec import SweepSpec, describe_dataset, objective_values
from cvad.sweep.study import Ending, SweepError, SweepStudy, TrialAttrs, params_key, set_constraints
from cvad.sweep.unsent import UnsentRecords
from cvad.tracking import Tag, TrackingStore, resolve_tracking_uri, trial_tags

if TYPE_CHECKING:
    from ray import ObjectRef

    from cvad.sweep.worker import TrialOutput

MAX_CONSECUTIVE_DUPLICATES = 50

__all__ = ["SweepError", "SweepOptions", "SweepOutcome", "SweepRunner"]


def best_effort(function: Callable, *args: object) -> None:
    """What a stopping driver still tries to write: what fails is settled by the next ``--resume``."""
    try:
        function(*args)
    except Exception:
        pass


@dataclass
class SweepOptions:
    store_dir: Path = Path("runs")
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite in store_dir
    storage: str | None = None  # Optuna storage; default: CVAD_STUDY_STORAGE, else sqlite in store_dir
    address: str | None = None  # Ray cluster; default: RAY_ADDRESS, else a local Ray
    resume: bool = False
    n_trials: int | None = None  # total finished trials to reach (default: the spec's, or the grid)
    service_wait: float = DEFAULT_WAIT  # seconds to wait for a lost tracking store or study storage

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
    warnings: list[str] = field(default_factory=list)  # what the driver could not write (and went on without)

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
    written: bool = False  # its run is FINISHED in MLflow with the whole record


class SweepRunner:
    """Runs one sweep to its trial budget; ``printer`` receives progress lines."""

    def __init__(self, spec: SweepSpec, options: SweepOptions, printer: Callable[[str], None] = print) -> None:
        self.spec, self.options, self.say = spec, options, printer
        self.started = time.perf_counter()
        self.remaining = 0  # trials this session submits at most
        self.submitted = 0
        self.duplicates = 0  # consecutive proposals of configurations that already ran
        self.running: dict[ObjectRef, RunningTrial] = {}
        self.ran_on: dict[int, str] = {}  # trial number -> the worker its latest attempt runs on
        self.retried: set[int] = set()  # trials Ray reran after losing their node
        self.steps_logged: dict[int, set[int]] = {}  # trial number -> steps already logged live
        self.pending: list[TrialOutcome] = []  # concluded trials whose recording is still to do
        self.prices: dict[str, dict] = {}  # run config (JSON) -> its efficiency, priced before training
        self.timings: dict[str, float] = {}
        self.tasks: dict[str, list[str]] = {}  # section_key -> the category list pinned for the whole sweep
        self.streams: dict[TaskStream, TaskStream] = {}  # each listed stream (it is its own key)
        self.warnings: list[str] = []
        self.unsent = UnsentRecords(options.store_dir)
        self.patience = Patience(options.service_wait, printer)
        self.executor: RayExecutor | None = None
        self.hold: SweepHold | None = None
        self.parent: str | None = None  # the sweep's MLflow run

    # -- set-up ------------------------------------------------------------------------------
    def check_data(self) -> dict[str, list[str]]:
        """List every dataset section's task stream once, before anything is created or started.

        Each distinct dataset section of the configurations the spec validated (grid points, the ranges'
        ends, or a huge space's covering set) is read as a trial would list it; a ``DatasetError`` stops the
        sweep here.
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
                    used = f" (used by {section.points} of the validated configuration(s), e.g. {chosen})"
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
        """Run the sweep; a store that stays lost (``ServiceLost``) stops it cleanly, as a ``SweepError``."""
        self.spec.n_trials(self.options.n_trials)  # a grid too large to run without a budget: refused here
        tasks = self.check_data()  # before the study, the MLflow experiment and Ray exist
        self.options.store_dir.mkdir(parents=True, exist_ok=True)  # Optuna's sqlite file, even with a remote MLflow
        try:
            try:
                self.open_stores()
                return self.drive(tasks)
            except ServiceLost as lost:
                raise SweepError(self.stop_lost(lost)) from None
        finally:
            self.release()

    def open_stores(self) -> None:
        """The MLflow experiment and the study, each behind ``patience``; then this driver's hold on the study."""
        started = time.perf_counter()
        uri = self.options.resolved_tracking_uri()
        self.store = Patient(TrackingStore(uri), Service.tracking(uri), self.patience)
        self.experiment = self.store.open_experiment(self.spec.name, artifact_root=self.artifact_root())
        url = self.options.resolved_storage()
        storage = patient_storage(url, self.patience)
        self.study = SweepStudy.open(self.spec, storage, self.options.resume, shown=storage.service.name)
        self.hold = SweepHold(self.study.study, self.spec.name, self.say)
        self.hold.take()  # before the study is asked for anything
        self.timings["store_setup"] = time.perf_counter() - started

    def drive(self, tasks: dict[str, list[str]]) -> SweepOutcome:
        spec, settings = self.spec, self.spec.settings
        started = time.perf_counter()
        self.tasks = self.study.pin_tasks(tasks)
        self.detectors = DetectorKeeper(settings.detectors, self.options.store_dir, self.store, self.say, self.warn)
        self.parent = self.study.parent_run
        if self.parent is None:
            sweep_tags = {Tag.SWEEP: spec.name, Tag.SAMPLER: settings.sampler.name, Tag.VERSION: cvad.__version__}
            self.parent = self.study.parent_run = self.store.start_sweep(
                self.experiment, spec.name, spec.raw, sweep_tags
            )
        else:
            self.store.reopen_sweep(self.parent)
        self.send_unsent()
        self.study.recover_stale(self.store, self.say)
        self.remaining = self.study.queue_work(self.options.n_trials)
        self.timings["store_setup"] += time.perf_counter() - started
        self.say(
            f"sweep {spec.name}: {self.remaining} trial(s) to run ({settings.sampler.name}); study in "
            f"{self.study.storage}; runs in {self.store.service.name} (experiment {spec.name})"
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

    def release(self) -> None:
        """Give the hold back (at once: a lost storage keeps it, and the next driver takes it over)."""
        if self.hold is None:
            return
        with self.patience.none():
            try:
                self.hold.release()
            except Exception:  # the storage is away: the next --resume sees a dead holder and takes over
                pass

    def warn(self, text: str, run_id: str | None = None) -> None:
        """Something the sweep goes on without (a file not written): said, kept for the outcome, tagged on the run."""
        self.warnings.append(text)
        self.say(f"warning: {text}")
        if run_id is not None:
            try:
                self.store.set_tags(run_id, {Tag.WARNING: text[:4900]})
            except ServiceLost:
                raise
            except Exception:  # the tag is a courtesy; the line above said it
                pass

    # -- a lost store ------------------------------------------------------------------------
    def send_unsent(self) -> None:
        """Records a driver that lost its MLflow store kept on disk: sent to their runs now, before anything reruns."""
        run_ids = {TrialAttrs.of(t).run_id: t.number for t in self.study.trials(optuna.trial.TrialState.RUNNING)}
        for run_id in self.unsent.run_ids():
            if run_id not in run_ids:
                continue  # another sweep's, in the same store folder
            self.finish_in_mlflow(run_ids[run_id], run_id, self.unsent.output(run_id))
            self.unsent.drop(run_id)
            self.say(f"trial {run_ids[run_id]}: its record, kept when the tracking store was lost, is now in MLflow")

    def stop_lost(self, lost: ServiceLost) -> str:
        """Stop after a store stayed lost: finished trials recorded (in MLflow if it answers, else kept on disk for
        ``--resume``), running ones stopped; returns the message for the user."""
        sent, kept, dropped = [], [], []
        with self.patience.none():
            for outcome in self.pending:
                if outcome.output is None or outcome.error is not None or outcome.written:
                    continue  # failed trials rerun; written ones are recorded
                number, run_id = outcome.running.trial.number, outcome.running.run_id
                try:
                    self.finish_in_mlflow(number, run_id, outcome.output)
                    sent.append(number)
                except Exception:
                    try:
                        self.unsent.keep(run_id, outcome.output)
                        kept.append(number)
                    except OSError as exc:
                        dropped.append(f"trial {number} ({short_error(exc)})")
            stopped = sorted(r.trial.number for r in self.running.values())
            for ref, running in list(self.running.items()):
                self.executor.cancel(ref)
                best_effort(self.store.end_trial, running.run_id, "KILLED")
                best_effort(self.study.interrupt, running.trial)
            self.running.clear()
            if self.parent is not None:
                best_effort(self.store.end_sweep, self.parent, "KILLED", {})
        lines = [str(lost), "the sweep stopped; nothing recorded before is lost"]
        if sent:
            lines.append(f"finished trial(s) {', '.join(map(str, sent))} are recorded in MLflow")
        if kept:
            lines.append(
                f"finished trial(s) {', '.join(map(str, kept))} could not be recorded: their records are kept in "
                f"{self.unsent.root} and are sent by --resume"
            )
        if dropped:
            lines.append(f"could not keep the records of {', '.join(dropped)}: they rerun")
        if stopped:
            lines.append(f"running trial(s) {', '.join(map(str, stopped))} were stopped: they rerun")
        lines.append(
            f"once {lost.service.name} answers again, continue with "
            f"`cvad sweep {self.spec.source} --resume` (and the same --store/--tracking-uri/--storage)"
        )
        return "\n  ".join(lines)

    def has_room(self) -> bool:
        """Whether a trial is still to submit and the cluster can run it now."""
        return self.submitted < self.remaining and len(self.running) < self.executor.capacity()

    def fill(self) -> None:
        """Ask Optuna for trials and submit them while the cluster has room."""
        while self.has_room():
            self.hold.check()  # never a trial asked for by a driver that no longer holds the sweep
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
        self.hold.renew()
        self.log_reports()
        self.pending += [self.conclude(ref) for ref in ready]

    def flush(self) -> None:
        """Record the concluded trials (MLflow, then Optuna), then say where the sweep stands."""
        if not self.pending:
            return
        while self.pending:  # one at a time: a store lost midway leaves the rest pending for stop_lost
            self.record(self.pending[0])
            self.pending.pop(0)
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
        shown = f"pruned: {label}" if over_budget else label  # the MLflow UI's runs list shows the name first
        run_id = self.store.start_trial(
            self.experiment, self.parent, f"{trial.number:03d} {shown}", config.to_dict(), tags
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
            self.store.end_pruned(
                run_id, over_budget, {k: price[k] for k in ("memory_mb", "memory_bytes", "gflops", "gmacs")}
            )
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
        """Log what workers reported to their trials' runs (where an attempt runs, each step); with the tracking
        store away they are skipped at once (``record`` logs them from the trial's record), so a lost store never
        holds up the trials."""
        for report in self.executor.reports():
            running = next((r for r in self.running.values() if r.trial.number == report.number), None)
            if running is None:
                continue
            tags = {}
            if self.ran_on.get(report.number) != report.worker:
                tags[Tag.WORKER] = report.worker
                if report.number in self.ran_on:  # a second worker: Ray reran the trial after losing a node
                    self.retried.add(report.number)
                    tags[Tag.RETRIED] = "true"
                    self.say(f"[{self.elapsed()}] trial {report.number} rerun on {report.worker}: Ray lost its node")
                self.ran_on[report.number] = report.worker
            with self.patience.none():
                try:
                    if tags:  # live, for a running trial's page; ``write_result`` sets them again
                        self.store.set_tags(running.run_id, tags)
                    if isinstance(report, StepReport):
                        self.store.log_step(running.run_id, report.step, report.tasks, report.rows)
                except ServiceLost:
                    continue
            if not isinstance(report, StepReport):
                continue
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
        if outcome.error is not None:
            if output is not None:
                self.write_result(number, run_id, output)
            self.store.end_trial(run_id, "FAILED", outcome.error, outcome.details)
            self.study.tell_failure(running.trial, outcome.error)
            label = TrialAttrs.of(running.trial).label
            self.say(f"[{self.elapsed()}] trial {number} FAILED after {seconds:.0f}s ({label}): {outcome.error}")
            return
        self.finish_in_mlflow(number, run_id, output)
        outcome.written = True
        values = self.study.tell_record(running.trial, output.record)
        shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.spec.settings.objectives, values))
        weights = "" if output.record.pretrained else "  [RANDOM WEIGHTS]"
        self.say(f"[{self.elapsed()}] trial {number} done in {seconds:.0f}s: {shown}{weights}")

    def finish_in_mlflow(self, number: int, run_id: str, output: TrialOutput) -> None:
        """A completed trial's whole record in its run, its detector kept (``sweep.detectors``), the run FINISHED."""
        detector = self.write_result(number, run_id, output)
        if detector is not None:
            try:
                self.detectors.keep(run_id, detector)
            except OSError as exc:
                self.warn(
                    f"trial {number}: its fitted detector was not kept ({short_error(exc)}): it cannot be exported "
                    "from this sweep (cvad run of its config keeps one)",
                    run_id,
                )
        self.store.end_trial(run_id, "FINISHED")

    def write_result(self, number: int, run_id: str, output: TrialOutput) -> bytes | None:
        """The trial's steps, final metrics and tags, then its files (a file that cannot be written is a warning,
        the metrics stay); returns its fitted detector's bytes, if the worker sent one."""
        artifacts = dict(output.artifacts)
        detector = artifacts.pop(DETECTOR_FILE, None)  # kept or not by sweep.detectors
        record = output.record
        self.store.set_tags(
            run_id, {Tag.WORKER: output.worker} | ({Tag.RETRIED: "true"} if number in self.retried else {})
        )
        for step in (s.step for s in record.steps):  # steps whose live report was lost
            if step not in self.steps_logged.get(number, set()):
                self.store.log_step(run_id, step, record.tasks, record.row(step))
        self.store.log_outcome(run_id, record)
        try:
            self.store.log_files(run_id, record, artifacts)
        except ServiceLost:
            raise
        except Exception as exc:
            self.warn(
                f"trial {number}: its files (result.json, config.yaml, matrices) were not written to MLflow "
                f"({short_error(exc)}); its metrics and tags are recorded",
                run_id,
            )
        return detector

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
            warnings=list(self.warnings),
        )
