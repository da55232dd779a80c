"""The sweep's Optuna study: the source of truth for what has run.

``SweepStudy`` opens (or resumes) the study, pins the task lists, recovers trials a dead driver left
running and queues what must (re)run. What cvad keeps on each trial is one typed record,
``TrialAttrs``, and where a trial stands one enum, ``Ending``:

- COMPLETE: done, never run again (DUPLICATE: a proposal of a configuration that already ran, told its values);
- FAILED: the trial itself failed (an exception, NaN, out of memory); recorded, not rerun;
- PRUNED: priced before training (``cvad.cost``) and over the sweep's constraints; never run;
- INTERRUPTED: Ctrl-C or a dead driver; its parameters are queued again;
- RUNNING / WAITING: being run, or enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from cvad.record import TrialRecord
from cvad.sweep.spec import SweepSpec, describe_dataset, objective_values
from cvad.tracking import TrackingStore

PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study attribute: the sweep's MLflow run
TASKS_ATTR = "tasks"  # study attribute: the pinned task lists, {section_key: [category, ...]}
SPEC_ATTR = "spec"  # study attribute: the sweep's identity (SweepSpec.stored_form)


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says what to do."""


class Ending(Enum):
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETE = "complete"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"

    @property
    def settled(self) -> bool:
        """Never run again: complete (or a duplicate), failed, or pruned."""
        return self in (Ending.COMPLETE, Ending.DUPLICATE, Ending.FAILED, Ending.PRUNED)


@dataclass(frozen=True)
class TrialAttrs:
    """What cvad keeps on an Optuna trial (its user attributes, under the names in ``ATTR_NAMES``)."""

    run_id: str | None = None  # the trial's MLflow run
    label: str | None = None  # the configuration's name (cvad.catalog.config_name)
    error: str | None = None  # the root error of a failed trial
    pruned: str | None = None  # why it was priced over budget
    duplicate_of: int | None = None  # the trial whose configuration it repeats
    interrupted: bool = False

    @classmethod
    def of(cls, trial: FrozenTrial | optuna.Trial) -> TrialAttrs:
        attrs = trial.user_attrs
        values: dict[str, Any] = {f.name: attrs.get(ATTR_NAMES[f.name]) for f in fields(cls)}
        state = getattr(trial, "state", None)
        # Studies of earlier versions marked a trial a dead driver left as FAIL without an error.
        values["interrupted"] = bool(values["interrupted"]) or (state == TrialState.FAIL and values["error"] is None)
        return cls(**values)

    def write(self, trial: optuna.Trial, **changes: Any) -> TrialAttrs:
        """Set ``changes`` on the trial; returns the attributes with them."""
        for name, value in changes.items():
            trial.set_user_attr(ATTR_NAMES[name], value)
        return replace(self, **changes)


ATTR_NAMES = {f.name: f.name for f in fields(TrialAttrs)} | {"run_id": "mlflow_run_id"}


def ending_of(trial: FrozenTrial) -> Ending:
    attrs = TrialAttrs.of(trial)
    if trial.state == TrialState.COMPLETE:
        return Ending.DUPLICATE if attrs.duplicate_of is not None else Ending.COMPLETE
    if trial.state == TrialState.PRUNED:
        return Ending.PRUNED
    if trial.state == TrialState.FAIL:
        return Ending.INTERRUPTED if attrs.interrupted else Ending.FAILED
    return Ending.WAITING if trial.state == TrialState.WAITING else Ending.RUNNING


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler; budgets reach it as each trial's Optuna constraints (``set_constraints``)."""
    settings = spec.settings
    name, seed = settings.sampler.name, settings.sampler.seed
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.sampler.startup_trials)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=settings.sampler.population_size)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued, the sampler only breaks ties


def set_constraints(trial: optuna.Trial, values: dict[str, float]) -> None:
    """The trial's budgets as Optuna constraints (<= 0 feasible): samplers and ``best_trials`` honour them."""
    for name, value in values.items():
        trial.set_constraint(name, value)


def feasible(trial: FrozenTrial) -> bool:
    """Within every budget; studies of earlier versions kept the constraint values as a user attribute."""
    legacy = trial.user_attrs.get("constraints") or []
    return all(c <= 0 for c in (*trial.constraints.values(), *legacy))


class SweepStudy:
    """One sweep's study in its storage."""

    def __init__(self, study: optuna.Study, spec: SweepSpec, storage: str) -> None:
        """``storage``: where the study lives, as it may be printed (no password)."""
        self.study, self.spec, self.storage = study, spec, storage

    @classmethod
    def open(cls, spec: SweepSpec, storage: str | BaseStorage, resume: bool, shown: str | None = None) -> SweepStudy:
        """Create the study, or load it for ``resume``; a name taken without --resume, or another file, is refused.

        ``shown``: the storage as messages name it (default: ``storage`` itself, a URL).
        """
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        shown = shown or str(storage)
        exists = spec.name in optuna.study.get_all_study_names(storage)
        if exists and not resume:
            raise SweepError(
                f"sweep {spec.name!r} already exists in {shown}; pass --resume to continue it, "
                f"or --set sweep.name={spec.name}-2 to start another"
            )
        if resume and not exists:
            raise SweepError(f"nothing to resume: no sweep {spec.name!r} in {shown}")
        sampler = make_sampler(spec)
        if not exists:
            try:
                study = optuna.create_study(
                    study_name=spec.name, storage=storage, directions=spec.directions, sampler=sampler
                )
            except optuna.exceptions.DuplicatedStudyError:
                raise SweepError(
                    f"sweep {spec.name!r} was created in {shown} by another driver a moment ago; "
                    "pass --resume to join it once that driver has stopped, or choose another sweep name"
                ) from None
            study.set_user_attr(SPEC_ATTR, spec.stored_form())
        else:
            study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
            if study.user_attrs.get(SPEC_ATTR) != spec.stored_form():
                raise SweepError(
                    f"sweep {spec.name!r} in {shown} was started from a different sweep file or --set values; "
                    "resume with the same ones (only --n-trials / --max-trials may change), or start a new sweep name"
                )
        return cls(study, spec, shown)

    @property
    def parent_run(self) -> str | None:
        return self.study.user_attrs.get(PARENT_RUN_ATTR)

    @parent_run.setter
    def parent_run(self, run_id: str) -> None:
        self.study.set_user_attr(PARENT_RUN_ATTR, run_id)

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def pin_tasks(self, tasks: dict[str, list[str]]) -> dict[str, list[str]]:
        """Store the resolved task lists in a new study; on resume, refuse lists that changed since the start.
        Returns the lists every trial runs on."""
        pinned = self.study.user_attrs.get(TASKS_ATTR)
        if pinned is None:  # a new study, or one from before pinning: its lists start now
            self.study.set_user_attr(TASKS_ATTR, tasks)
            return tasks
        for key, names in tasks.items():
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
                f"sweep {self.spec.name!r} in {self.storage} runs dataset {describe_dataset(json.loads(key))} "
                f"on the categories {', '.join(before)}, pinned when it started; the dataset now has "
                f"{', '.join(names)} ({change}). Trials of one sweep must run on the same tasks: start a new "
                f"sweep name (--set sweep.name={self.spec.name}-2) to use the new categories, or restore the "
                "dataset folder to resume this one"
            )
        if any(key not in pinned for key in tasks):
            self.study.set_user_attr(TASKS_ATTR, {**tasks, **pinned})
        return {key: pinned.get(key, names) for key, names in tasks.items()}

    def tell_record(self, trial: optuna.Trial, record: TrialRecord) -> list[float]:
        """A trial finished: Optuna gets its record's objective values (and its constraint values); returns them."""
        constraints = self.spec.settings.constraints
        if constraints.active:
            set_constraints(trial, constraints.values(record.efficiency))
        values = objective_values(self.spec, record)
        self.study.tell(trial, values)
        return values

    def tell_failure(self, trial: optuna.Trial, error: str) -> None:
        TrialAttrs.of(trial).write(trial, error=error)
        self.study.tell(trial, state=TrialState.FAIL)

    def recover_stale(self, store: TrackingStore, say: Callable[[str], None]) -> None:
        """Trials left RUNNING by a driver that died (even by SIGKILL).

        MLflow is written before Optuna is told, so a run already FINISHED holds the whole record:
        Optuna gets its values from it and nothing reruns. Any other is marked interrupted (its run
        KILLED) and reruns.
        """
        for frozen in self.trials(TrialState.RUNNING):
            trial = optuna.Trial(self.study, frozen._trial_id)
            run_id = TrialAttrs.of(frozen).run_id
            record = store.finished_record(run_id) if run_id else None
            if record is not None:
                self.tell_record(trial, record)
                say(f"trial {frozen.number} finished in an earlier session just before it stopped: its record is kept")
                continue
            self.interrupt(trial)
            if run_id:
                store.end_trial(run_id, "KILLED")
            say(f"trial {frozen.number} was interrupted in an earlier session: it will be rerun")

    def interrupt(self, trial: optuna.Trial) -> None:
        TrialAttrs().write(trial, interrupted=True)
        self.study.tell(trial, state=TrialState.FAIL)

    def queue_work(self, n_trials: int | None) -> int:
        """Enqueue what this session must (re)run, and no more; return how many trials it may still finish.

        A grid's points are taken in the spec's ``run_order`` (a huge grid's: a seeded random draw), so a budget
        enqueues only its share of the grid, and --resume draws the same points again, skipping settled ones.
        """
        target = self.spec.n_trials(n_trials)  # a huge grid without a budget is refused before anything is enqueued
        trials = self.trials()
        settled = [t for t in trials if ending_of(t).settled]
        done = {params_key(t.params) for t in settled}
        # An enqueued trial has no params yet: Optuna keeps them as its "fixed_params".
        waiting = {params_key(t.system_attrs.get("fixed_params", {})) for t in trials if t.state == TrialState.WAITING}
        unique = len([t for t in settled if ending_of(t) != Ending.DUPLICATE])
        remaining = max(0, target - unique)
        grid = self.spec.grid_points
        if grid is not None:
            wanted = (grid[index] for index in self.spec.run_order())
        else:
            wanted = (t.params for t in trials if ending_of(t) == Ending.INTERRUPTED)
        for params in wanted:
            if len(waiting) >= remaining:
                break
            key = params_key(params)
            if key not in done and key not in waiting:
                self.study.enqueue_trial(params)
                waiting.add(key)
        return remaining if grid is None else min(remaining, len(waiting))

    def same_as_finished(self, trial: optuna.Trial) -> FrozenTrial | None:
        """A completed trial with ``trial``'s configuration (a sampler may propose one again), or None."""
        key = params_key(trial.params)
        for other in self.trials(TrialState.COMPLETE):
            if params_key(other.params) == key and ending_of(other) == Ending.COMPLETE:
                return other
        return None

    def best_trials(self) -> list[FrozenTrial]:
        """Optuna's best trials (the Pareto front, or the best one), feasible and not duplicates, best first."""
        complete = self.trials(TrialState.COMPLETE)
        if not complete:
            return []
        front = [t for t in self.study.best_trials if ending_of(t) == Ending.COMPLETE and feasible(t)]
        first_up = self.spec.directions[0] == "maximize"
        return sorted(front, key=lambda t: (-t.values[0] if first_up else t.values[0], t.number))

    def counts(self) -> dict[Ending, int]:
        counted = dict.fromkeys(Ending, 0)
        for trial in self.trials():
            counted[ending_of(trial)] += 1
        return counted
