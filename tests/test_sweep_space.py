"""Huge sweep spaces: a grid counted and decoded lazily, validated by a covering set, run only with a budget."""

from __future__ import annotations

import copy
import itertools

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

import cvad.sweep.spec
from cvad.cli import cli
from cvad.config import ConfigError
from cvad.stream import section_key
from cvad.sweep.runner import SweepOptions, SweepRunner
from cvad.sweep.space import Grid, covering, parse_space, sample, shuffled
from cvad.sweep.spec import SweepSpec, data_key
from cvad.sweep.study import SweepStudy
from support import CNN, VIT, tiny_sweep

SEEDS = 250_000
MILLION = SEEDS * 2 * 2
# A ViT under PatchCore and a CNN under DINOmaly cannot be built: valid one by one, half the pairs are not.
INVALID_PAIR = {"backbone.name": VIT, "model.name": "patchcore"}


def million_grid(name: str, cache, **sweep) -> dict:
    """A grid of a million points (250,000 seeds x 2 backbones x 2 methods) in which half the pairs are invalid."""
    space = {
        "seed": {"int": [0, SEEDS - 1], "step": 1},
        "backbone": {"name": [VIT, CNN]},
        "model": {"name": ["dinomaly", "patchcore"]},
    }
    return tiny_sweep(name, cache, space=space, **sweep)


def counting_validation(monkeypatch) -> list[int]:
    """Counts the run configs the spec validates."""
    calls = []
    validate = cvad.sweep.spec.validate_config

    def counted(raw: dict):
        calls.append(1)
        return validate(raw)

    monkeypatch.setattr(cvad.sweep.spec, "validate_config", counted)
    return calls


def waiting_params(study: SweepStudy) -> list[dict]:
    return [t.system_attrs["fixed_params"] for t in study.trials(TrialState.WAITING)]


def asked(study: SweepStudy) -> optuna.Trial:
    """The next trial, its parameters drawn as the runner's ``config_for`` draws them."""
    trial = study.study.ask()
    sample(study.spec.space, trial, {})
    return trial


def write(tmp_path, raw: dict) -> str:
    path = tmp_path / f"{raw['sweep']['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the order of the space's keys is the grid's
    return str(path)


# -- the grid --------------------------------------------------------------------------------


def test_a_million_point_grid_is_counted_and_validated_by_a_few_configurations(builtin_cache, monkeypatch):
    calls = counting_validation(monkeypatch)
    spec = SweepSpec(million_grid("million", builtin_cache))
    assert len(spec.grid_points) == MILLION
    assert spec.grid_points[-1] == {"seed": SEEDS - 1, "backbone.name": CNN, "model.name": "patchcore"}
    assert spec.grid_points[3 * 4 + 2] == {"seed": 3, "backbone.name": CNN, "model.name": "dinomaly"}
    assert len(calls) == 2  # the covering set: each seed end, backbone and method once, in two valid pairs
    with pytest.raises(IndexError):
        spec.grid_points[MILLION]


def test_decoding_an_index_gives_the_point_of_the_grids_nested_loop_order():
    space = parse_space(
        {"a": [1, 2], "b": [{"name": "x"}, {"name": "y", "c": {"int": [3, 5], "step": 2}}], "d": {"float": [0, 1]}}
    )
    expected = [
        {"a": a, "b": "x", "d": d} if b is None else {"a": a, "b": "y", "b[y].c": b, "d": d}
        for a in (1, 2)
        for b in (None, 3, 5)
        for d in (0, 1)
    ]
    corners = Grid(space, ends=True)  # a float range without a step: its ends
    assert list(corners) == expected and corners == expected
    assert [corners[i] for i in range(len(corners))] == expected and corners[-1] == expected[-1]
    assert len(Grid(parse_space({}))) == 1 and list(Grid(parse_space({}))) == [{}]


def test_the_covering_set_shows_every_branch_and_value_and_every_dataset_combination():
    space = parse_space(
        {
            "seed": {"int": [0, 99], "step": 1},
            "backbone": {"name": ["a", "b", "c"]},
            "model": [{"name": "padim"}, {"name": "patchcore", "params": {"bank_size": [10, 20]}}],
            "dataset": {"root": ["/x", "/y"], "tasks": {"choices": [["t1"], ["t2"]]}},
        }
    )
    points = covering(space, joint="dataset", ends=False)
    assert len(points) == 4 < len(Grid(space))
    assert {p["seed"] for p in points} == {0, 99}  # a range: its ends
    assert {p["backbone.name"] for p in points} == {"a", "b", "c"}
    assert {p["model"] for p in points} == {"padim", "patchcore"}
    assert {p["model[patchcore].params.bank_size"] for p in points if p["model"] == "patchcore"} == {10, 20}
    sections = {(p["dataset.root"], p["dataset.tasks"]) for p in points}
    assert sections == {("/x", '["t1"]'), ("/x", '["t2"]'), ("/y", '["t1"]'), ("/y", '["t2"]')}


def test_every_dataset_section_of_a_huge_grid_is_checked_before_it_starts(builtin_cache):
    raw = million_grid("sections", builtin_cache)
    raw["space"]["dataset"] = {
        "builtin": {"categories": {"choices": [["brick"], ["grass"]]}, "train_per_category": [3, 4]}
    }
    spec = SweepSpec(raw)
    assert len(spec.datasets) == 4  # every combination of the dataset's choices, not each choice once
    tasks = {section_key(s.config): list(s.config.builtin.categories) for s in spec.datasets.values()}
    drawn = (spec.grid_points[i] for i in spec.run_order())
    valid = [p for p in itertools.islice(drawn, 100) if (p["backbone.name"] == VIT) == (p["model.name"] == "dinomaly")]
    for point in valid:
        spec.config_for(optuna.trial.FixedTrial(point), tasks)  # none "was not checked when the sweep started"
    assert {data_key(spec.config_for(optuna.trial.FixedTrial(p)).dataset) for p in valid} == set(spec.datasets)


def test_a_small_grid_is_still_validated_at_every_point(builtin_cache):
    raw = million_grid("small", builtin_cache)
    raw["space"]["seed"] = [0, 1]
    with pytest.raises(ConfigError, match="invalid run config at seed=0, backbone.name=deit_tiny_patch16_224"):
        SweepSpec(raw)


def test_a_combination_the_covering_set_missed_fails_as_its_trial_not_the_sweep(tmp_path, builtin_cache):
    spec = SweepSpec(million_grid("missed", builtin_cache))
    lines = []
    runner = SweepRunner(spec, SweepOptions(store_dir=tmp_path), printer=lines.append)
    runner.study = SweepStudy.open(spec, f"sqlite:///{tmp_path / 'optuna.db'}", resume=False)
    runner.tasks = {section_key(s.config): ["brick", "grass"] for s in spec.datasets.values()}
    runner.study.study.enqueue_trial({"seed": 7, **INVALID_PAIR})
    trial = runner.study.study.ask()
    runner.submit(trial)
    (failed,) = runner.study.trials(TrialState.FAIL)
    assert "patchcore" in failed.user_attrs["error"] and "deit_tiny_patch16_224" in failed.user_attrs["error"]
    assert any(line.startswith(f"trial {trial.number} FAILED before running") for line in lines)


def test_the_draw_is_a_lazy_seeded_permutation():
    drawn = list(shuffled(1000, seed=3))
    assert sorted(drawn) == list(range(1000)) and drawn != list(range(1000))
    assert drawn == list(shuffled(1000, seed=3)) and drawn != list(shuffled(1000, seed=4))
    first = list(itertools.islice(shuffled(10**12, seed=3), 5))  # a trillion indices cost nothing until drawn
    assert len(set(first)) == 5 and first[:3] == list(itertools.islice(shuffled(10**12, seed=3), 3))


# -- the command line ------------------------------------------------------------------------


def test_dry_run_of_a_million_point_grid_prints_its_size_structure_and_a_sample(tmp_path, builtin_cache):
    path = write(tmp_path, million_grid("dry", builtin_cache))
    result = CliRunner().invoke(cli, ["sweep", path, "--dry-run", "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "grid of 1,000,000 configurations:" in out
    assert "seed: int in [0, 249999] step 1" in out and "model.name: one of ['dinomaly', 'patchcore']" in out
    assert "a run is refused without a budget" in out and "--max-trials N" in out
    listed = [line for line in out.splitlines() if line.startswith("  ") and line.strip()[0].isdigit()]
    assert len(listed) == 10  # the grid's first five and the first five a budget draws
    assert listed[0].split(None, 1) == ["0", "Tiny-Dinomaly + DeiT-Tiny, finetune"]  # named by catalog.config_name
    assert listed[1].split(None, 1)[1].startswith("invalid, its trial would fail before running: invalid config")
    budgeted = CliRunner().invoke(cli, ["sweep", path, "--dry-run", "--max-trials", "300"])
    assert "300 of them will run, drawn at random (seed 0)" in budgeted.output
    assert not (tmp_path / "store").exists()


def test_a_million_point_grid_without_a_budget_is_refused_before_anything_is_created(tmp_path, builtin_cache):
    path = write(tmp_path, million_grid("unbudgeted", builtin_cache))
    store = tmp_path / "store"
    result = CliRunner().invoke(cli, ["sweep", path, "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert "the grid has 1,000,000 configurations, more than the 10,000 a sweep runs without a budget" in result.output
    assert "pass --max-trials N (or set sweep.n_trials)" in result.output
    assert not store.exists()  # no optuna.db, no mlflow.db, no Ray
    assert SweepSpec(million_grid("in-file", builtin_cache, n_trials=50)).n_trials() == 50  # the file's budget counts


# -- queuing ---------------------------------------------------------------------------------


def test_a_budget_on_a_huge_grid_queues_only_its_share_and_resume_draws_the_same(tmp_path, builtin_cache):
    raw = million_grid("budget", builtin_cache, sampler={"name": "grid", "seed": 5})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = SweepSpec(copy.deepcopy(raw))
    draw = [spec.grid_points[i] for _, i in zip(range(10), spec.run_order())]
    study = SweepStudy.open(spec, storage, resume=False)
    assert study.queue_work(6) == 6
    assert waiting_params(study) == draw[:6]  # six of a million enqueued, the seeded draw's first
    done, failed, cut = (asked(study) for _ in range(3))
    study.study.tell(done, [0.5, 1.0])
    study.tell_failure(failed, "ValueError: boom")
    study.interrupt(cut)

    again = SweepStudy.open(SweepSpec(copy.deepcopy(raw)), storage, resume=True)
    assert again.queue_work(6) == 4  # the finished and the failed are settled; the interrupted one reruns
    assert sorted(map(str, waiting_params(again))) == sorted(map(str, draw[3:6] + [draw[2]]))
    assert again.queue_work(9) == 7  # a larger budget extends the same draw
    assert sorted(map(str, waiting_params(again))) == sorted(map(str, draw[2:9]))


def test_a_small_grid_is_queued_in_its_order_as_far_as_the_budget(tmp_path, builtin_cache):
    spec = SweepSpec(tiny_sweep("small-grid", builtin_cache))
    study = SweepStudy.open(spec, f"sqlite:///{tmp_path / 'optuna.db'}", resume=False)
    assert study.queue_work(2) == 2 and waiting_params(study) == list(spec.grid_points)[:2]
    assert study.queue_work(None) == 4 and waiting_params(study) == list(spec.grid_points)
