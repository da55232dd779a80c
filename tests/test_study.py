"""Where each trial of a sweep's study stands: one typed record of what cvad keeps on it, one state."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from cvad.sweep.study import Ending, TrialAttrs, ending_of, feasible, set_constraints


def test_each_trial_has_one_ending_and_old_studies_read_the_same():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize"])
    done, copy, failed, cut, legacy, pruned, running = (study.ask() for _ in range(7))
    study.tell(done, [0.5])
    TrialAttrs().write(copy, duplicate_of=done.number)
    study.tell(copy, [0.5])
    TrialAttrs().write(failed, error="ValueError: boom")
    study.tell(failed, state=TrialState.FAIL)
    TrialAttrs().write(cut, interrupted=True)
    study.tell(cut, state=TrialState.FAIL)
    study.tell(legacy, state=TrialState.FAIL)  # a study of an earlier version: interrupted, with no attribute
    TrialAttrs().write(pruned, pruned="3 MB > max_mb 2")
    study.tell(pruned, state=TrialState.PRUNED)
    endings = [ending_of(t) for t in study.get_trials()]
    assert endings == [
        Ending.COMPLETE, Ending.DUPLICATE, Ending.FAILED, Ending.INTERRUPTED, Ending.INTERRUPTED, Ending.PRUNED,
        Ending.RUNNING,
    ]  # fmt: skip
    assert [e.settled for e in endings] == [True, True, True, False, False, True, False]
    attrs = TrialAttrs.of(study.get_trials()[2])
    assert attrs.error == "ValueError: boom" and not attrs.interrupted and attrs.run_id is None
    assert TrialAttrs().write(running, run_id="r1", label="x") == TrialAttrs(run_id="r1", label="x")
    assert study.get_trials()[6].user_attrs == {"mlflow_run_id": "r1", "label": "x"}


def test_budgets_are_optuna_constraints_and_old_ones_still_count():
    study = optuna.create_study(directions=["maximize"])
    over, within, old = (study.ask() for _ in range(3))
    set_constraints(over, {"max_mb": 1.5})
    set_constraints(within, {"max_mb": -0.5})
    old.set_user_attr("constraints", [0.2])  # how earlier versions kept them
    for trial in (over, within, old):
        study.tell(trial, [1.0])
    assert [feasible(t) for t in study.get_trials()] == [False, True, False]
    assert study.get_trials()[0].constraints == {"max_mb": 1.5}
