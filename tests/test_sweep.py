"""Sweeps for real: Optuna studies in sqlite, Ray workers, MLflow runs in sqlite."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cvad.config import ConfigError
from cvad.sweep.runner import SweepError, SweepOptions, SweepRunner
from cvad.sweep.spec import SweepSpec, load_sweep
from layouts import make_mvtec_tree
from support import Gate, run_sweep, tiny_sweep, wait_until

CVAD = [sys.executable, "-m", "cvad"]


def mlflow_runs(store: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], max_results=1000)


def study_of(store: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{store / 'optuna.db'}")


def folder_dataset(root: Path, categories: tuple[str, ...] = ("cap", "nut"), masks: bool = True) -> Path:
    """A tiny dataset in the MVTec layout; without ``masks`` it lists and trains, but no pixel metric is defined."""
    make_mvtec_tree(root, categories, n_train=3, n_test_good=2, n_defect=2, size=48, masks=masks)
    return root


def folder_sweep(name: str, root: Path, space: dict | None = None) -> dict:
    raw = tiny_sweep(name, root.parent, space=space or {"model": {"name": "padim", "params": {"n_features": 8}}})
    raw["dataset"] = {"name": "folder", "root": str(root), "image_size": 48, "batch_size": 8}
    return raw


# -- sweep files ------------------------------------------------------------------------------


def test_conditional_grid_has_only_the_parameters_of_each_branch(builtin_cache):
    raw = tiny_sweep(
        "grid",
        builtin_cache,
        space={
            "backbone": {"name": ["mobilenetv2_100", "mcunet_in3"]},
            "strategy": [{"name": "finetune"}, {"name": "replay", "replay_size": [40, 100]}],
            "model": [
                {"name": "padim", "params": {"continual": ["unimodal", "multimodal"]}},
                {
                    "name": "patchcore",
                    "params": {"continual": "cl++", "bank_size": {"int": [1000, 3000], "step": 1000}},
                },
            ],
        },
    )
    spec = SweepSpec(raw)
    assert len(spec.grid_points) == 2 * 3 * (2 + 3)
    patchcore = [p for p in spec.grid_points if p["model"] == "patchcore"]
    assert {p["model[patchcore].params.bank_size"] for p in patchcore} == {1000, 2000, 3000}
    assert all("model[padim].params.continual" not in p for p in patchcore)
    finetune = [p for p in spec.grid_points if p["strategy"] == "finetune"]
    assert all("strategy[replay].replay_size" not in p for p in finetune)
    config = spec.config_for(optuna.trial.FixedTrial(patchcore[-1]))
    assert config.model.params["bank_size"] == 3000 and config.strategy.replay_size == 100


def test_whole_config_branches_give_each_method_its_own_backbones(builtin_cache):
    raw = tiny_sweep(
        "branches",
        builtin_cache,
        space=[
            {"model": {"name": "padim"}, "backbone": {"name": ["mobilenetv2_100", "mcunet_in3"]}},
            {"model": {"name": "patchcore", "params": {"bank_size": [100, 200]}}, "backbone": {"name": "resnet18"}},
        ],
    )
    points = SweepSpec(raw).grid_points
    assert points == [
        {"space": "padim", "space[padim].backbone.name": "mobilenetv2_100"},
        {"space": "padim", "space[padim].backbone.name": "mcunet_in3"},
        {"space": "patchcore", "space[patchcore].model.params.bank_size": 100},
        {"space": "patchcore", "space[patchcore].model.params.bank_size": 200},
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sweep": {"name": "x", "sampler": {"name": "annealing"}}}, "sweep.sampler.name"),
        ({"sweep": {"name": "x", "sampler": {"name": "tpe"}}}, "n_trials is required"),
        ({"sweep": {"name": "x", "objectives": ["maximize pixel_f2"]}}, "unknown metric 'pixel_f2'"),
        ({"datasets": {}}, "unknown top-level key(s) ['datasets']"),
        ({"space": {"model": {"params": {"bank_size": {"int": [10, 1]}}}}}, "low must not exceed high"),
        ({"space": {"model": {"params": {"lr": {"float": [0.001, 0.1]}}}}}, "grid sampler needs finite values"),
        ({"space": {"model": {"params": {"lr": {"float": [0, 1], "log": True}}}}}, "log scale needs low > 0"),
        (
            {"space": {"model": {"params": {"bank_size": {"int": [1, 4], "step": 0.5}}}}},
            "an int parameter's step must be a positive whole number (got 0.5)",
        ),
        (
            {"space": {"model": {"params": {"bank_size": {"int": [1000, 2500], "step": 1000}}}}},
            "steps of 1000 from 1000 never land on 2500; make high - low a multiple of the step (e.g. [1000, 2000])",
        ),
        ({"space": {"model": {"params": {"lr": {"float": [0.1, 0.5], "step": 0.3}}}}}, "never land on 0.5"),
        ({"space": {"strategy": [{"name": "replay"}, "finetune"]}}, "mixes mappings"),
        (
            {"space": {"model": [{"name": "padim"}, {"name": "patchcore", "params": {"bank_sise": [10]}}]}},
            "at model=patchcore, model[patchcore].params.bank_sise=10",
        ),
        ({"space": {"model": {"name": ["padim", "padimm"]}}}, "unknown model 'padimm'"),
    ],
)
def test_invalid_sweep_files_are_rejected_with_specific_errors(builtin_cache, change, message):
    raw = tiny_sweep("x", builtin_cache)
    raw.update(change)
    with pytest.raises(ConfigError) as error:
        SweepSpec(raw, source="bad.yaml")
    assert message in str(error.value)
    assert "bad.yaml" in str(error.value)


def test_branch_error_names_the_branch_and_the_bad_key(builtin_cache):
    raw = tiny_sweep("x", builtin_cache, space={"model": [{"name": "patchcore", "params": {"bank_sise": [10]}}]})
    with pytest.raises(ConfigError) as error:
        SweepSpec(raw)
    assert "model.params.bank_sise: unknown key" in str(error.value)


def test_shipped_sweep_files_are_valid(tmp_path):
    files = sorted(Path(__file__).parents[1].joinpath("sweeps").glob("*.yaml"))
    assert {p.name for p in files} >= {"edge.yaml", "paper-mvtec.yaml", "paper-visa.yaml"}
    for path in files:
        raw = yaml.safe_load(path.read_text())
        needs_root = raw.get("dataset", {}).get("name", "builtin") != "builtin" or "extends" in raw
        spec = load_sweep(path, [f"dataset.root={tmp_path}"] if needs_root else [])
        assert spec.n_trials() >= 1, path
    assert load_sweep(files[-1].parent / "paper-visa.yaml", [f"dataset.root={tmp_path}"]).name == "paper-visa"


def test_paper_grid_trains_with_each_methods_published_schedule(tmp_path):
    from cvad.models import METHODS

    spec = load_sweep(Path(__file__).parents[1] / "sweeps" / "paper-mvtec.yaml", [f"dataset.root={tmp_path}"])
    assert len(spec.grid_points) == 52
    checked = set()
    for point in spec.grid_points:
        config = spec.config_for(optuna.trial.FixedTrial(point))
        schedule = getattr(METHODS.get(config.model.name), "PAPER_TRAINING", {})
        assert {k: config.model.params[k] for k in schedule} == schedule, config.model.name
        if schedule:
            checked.add(config.model.name)
    assert checked == {"stfpm", "paste", "simplenet", "cfa", "dinomaly"}


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path, builtin_cache):
    base = tiny_sweep("base", builtin_cache)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "child.yaml").write_text(
        yaml.safe_dump({"extends": "base.yaml", "dataset": {"image_size": 64}, "space": {"seed": [1, 2]}})
    )
    spec = load_sweep(tmp_path / "child.yaml")
    assert spec.name == "child"  # never the base's study
    assert spec.fixed["dataset"]["image_size"] == 64 and spec.fixed["dataset"]["batch_size"] == 8
    assert len(spec.grid_points) == 4 * 2  # the space mapping gained a dimension
    assert {p["seed"] for p in spec.grid_points} == {1, 2}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_sweep(tmp_path / "loop.yaml")


@pytest.mark.slow
def test_dry_run_prints_the_grid(tmp_path, builtin_cache):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep("dry", builtin_cache)))
    out = subprocess.run([*CVAD, "sweep", str(path), "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert "grid of 4 configurations" in out
    assert "PaDiM multimodal + MobileNetV2, replay 2" in out
    assert not (tmp_path / "runs").exists()


# -- running sweeps -----------------------------------------------------------------------------


def trial_configs(runs) -> list[str]:
    return sorted(
        r.data.tags["mlflow.runName"][4:]
        for r in runs
        if r.data.tags.get("cvad.role") == "trial" and r.info.status == "FINISHED"
    )


@pytest.mark.slow
def test_grid_sweep_records_every_trial_in_mlflow_and_optuna(tmp_path, builtin_cache):
    raw = tiny_sweep("grid-run", builtin_cache)
    outcome = run_sweep(raw, tmp_path)
    assert (outcome.completed, outcome.failed) == (4, 0)
    client, runs = mlflow_runs(tmp_path, "grid-run")
    (parent,) = [r for r in runs if r.data.tags.get("cvad.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("cvad.role") == "trial"]
    assert len(trials) == 4 and parent.info.status == "FINISHED"
    study = study_of(tmp_path, "grid-run")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in trials}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["cvad.model"] == "padim" and run.data.tags["cvad.pretrained"] == "true"
        assert run.data.params["model.params.n_features"] == "8"
        history = client.get_metric_history(run.info.run_id, "pixel_f1")
        assert sorted(m.step for m in history) == [0, 1]  # one point per task of the stream
        assert {"task.brick.pixel_f1", "memory_mb", "gflops", "forgetting_pixel_f1"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"result.json", "config.yaml", "matrices", "overlays"} <= artifacts
        overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
        assert len(overlays) == 4 and all(p.endswith(".png") for p in overlays)
        assert yaml.safe_load(run.data.params["dataset.tasks"]) == [
            "brick",
            "grass",
        ]  # 'all', pinned to the concrete list
        (data,) = client.get_run(run.info.run_id).inputs.dataset_inputs  # the Dataset column: stream, file-list digest
        assert data.dataset.name == "builtin:brick+grass" and len(data.dataset.digest) == 16
        assert data.tags[0].value == "training"
        trial = next(t for t in complete if t.user_attrs["mlflow_run_id"] == run.info.run_id)
        assert trial.values[0] == pytest.approx(run.data.metrics["pixel_f1"])
        assert trial.values[1] == pytest.approx(run.data.metrics["memory_mb"])
    digests = {client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset.digest for run in trials}
    assert len(digests) == 1  # one stream, one digest
    assert client.get_experiment_by_name("grid-run").tags["mlflow.experimentKind"] == "custom_model_development"
    # Multimodal PaDiM stores one Gaussian per task: more memory than unimodal, as measured.
    mb = {r.data.params["model.params.continual"]: r.data.metrics["memory_mb"] for r in trials}
    assert mb["multimodal"] > mb["unimodal"]
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(raw, tmp_path)


def detector_runs(client, runs) -> dict[str, bool]:
    """Each trial run's id -> whether it holds the fitted detector (artifact and tag agree, or the test fails)."""
    kept = {}
    for run in runs:
        if run.data.tags.get("cvad.role") != "trial":
            continue
        artifact = "detector.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert run.data.tags.get("cvad.detector") == ("stored" if artifact else None), run.info.run_id
        assert run.data.metrics["detector_mb"] > 0  # its size is a metric whether or not the file is kept
        kept[run.info.run_id] = artifact
    return kept


@pytest.mark.slow
def test_only_the_trials_on_the_pareto_front_keep_their_fitted_detector(tmp_path, builtin_cache):
    import torch

    from cvad.detector import load_detector

    raw = tiny_sweep("front", builtin_cache)
    lines = []
    outcome = SweepRunner(SweepSpec(copy.deepcopy(raw)), SweepOptions(store_dir=tmp_path), printer=lines.append).run()
    assert outcome.completed == 4
    front = {t.user_attrs["mlflow_run_id"] for t in outcome.best}
    client, runs = mlflow_runs(tmp_path, "front")
    kept = detector_runs(client, runs)
    assert len(kept) == 4 and {run_id for run_id, stored in kept.items() if stored} == front
    assert 0 < len(front) < 4  # some trials are dominated: the default keeps theirs nowhere
    assert not any((tmp_path / "detectors").iterdir())  # nothing left staged
    assert any(f"kept the fitted detectors of {len(front)} trial(s) on the Pareto front" in line for line in lines)
    path = client.download_artifacts(min(front), "detector.pt", str(tmp_path))
    detector = load_detector(Path(path))
    detector.model(torch.rand(1, 3, 48, 48))  # the stored file is a working detector
    # ... that learns the next product from its run id
    from typer.testing import CliRunner

    from cvad.cli import cli
    from cvad.record import TrialRecord

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["learn", min(front), "--task", "hex_nut", "--out", str(tmp_path / "next"), "--tracking-uri", uri]
    learned = CliRunner().invoke(cli, args)
    assert learned.exit_code == 0, learned.output
    assert TrialRecord.read(tmp_path / "next" / "result.json").tasks == ["brick", "grass", "hex_nut"]

    # A driver killed before the end leaves files staged: --resume logs the front's, deletes the rest, and leaves
    # other sweeps' files in the same store alone.
    staged = tmp_path / "detectors"
    dominated = min(set(kept) - front)
    (staged / f"{min(front)}.pt").write_bytes(b"staged by a killed driver")
    (staged / f"{dominated}.pt").write_bytes(b"dominated")
    (staged / "another-sweeps-run.pt").write_bytes(b"not this sweep's")
    run_sweep(raw, tmp_path, resume=True)  # nothing left to run: only the staged files are settled
    assert sorted(p.name for p in staged.iterdir()) == ["another-sweeps-run.pt"]
    logged = Path(client.download_artifacts(min(front), "detector.pt", str(tmp_path / "again"))).read_bytes()
    assert logged == b"staged by a killed driver"
    assert not detector_runs(client, mlflow_runs(tmp_path, "front")[1])[dominated]
    # Exporting a dominated trial says why it has no detector and what keeps one.
    from cvad.deployment import DeploymentError, resolve_source
    from cvad.tracking import TrackingStore

    with pytest.raises(DeploymentError, match=r"kept no fitted detector.*sweep\.detectors: all.*cvad run"):
        resolve_source(dominated, TrackingStore(f"sqlite:///{tmp_path / 'mlflow.db'}"))


@pytest.mark.slow
def test_detectors_all_keeps_every_completed_trials_detector(tmp_path, builtin_cache):
    space = {"model": {"name": "padim", "params": {"n_features": [4, 8]}}}
    raw = tiny_sweep("all", builtin_cache, space=space, detectors="all")
    assert run_sweep(raw, tmp_path).completed == 2
    client, runs = mlflow_runs(tmp_path, "all")
    kept = detector_runs(client, runs)
    assert len(kept) == 2 and all(kept.values())
    assert not (tmp_path / "detectors").exists()  # logged as they came: nothing staged


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_complete(tmp_path, builtin_cache):
    raw = tiny_sweep(
        "with-failure",
        builtin_cache,
        space={
            "model": {"name": "padim", "params": {"n_features": 8}},
            # The folder has no masks: it lists and trains, but the pixel F1 objective is undefined, so its trial
            # fails after training, in the worker's result.
            "dataset": [
                {"name": "builtin"},
                {"name": "folder", "root": str(folder_dataset(tmp_path / "broken", masks=False))},
            ],
        },
    )
    outcome = run_sweep(raw, tmp_path)
    assert (outcome.completed, outcome.failed) == (1, 1)
    assert not outcome.all_failed
    assert outcome.failure_summary().startswith(
        "1 of 2 trials failed; the most common error, in 1 of them:\n"
        "  ValueError: objective pixel_f1 is None for this trial"
    )
    _, runs = mlflow_runs(tmp_path, "with-failure")
    status = {r.data.tags["cvad.dataset"]: r for r in runs if r.data.tags.get("cvad.role") == "trial"}
    assert status["builtin"].info.status == "FINISHED"
    assert status["folder"].info.status == "FAILED"
    assert "objective pixel_f1 is None" in status["folder"].data.tags["cvad.error"]
    (failed,) = study_of(tmp_path, "with-failure").get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["error"].startswith("ValueError: objective pixel_f1 is None for this trial")


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_1_with_the_most_common_error(tmp_path, builtin_cache):
    from typer.testing import CliRunner

    from cvad.cli import cli

    root = folder_dataset(tmp_path / "broken", masks=False)
    path = tmp_path / "all-fail.yaml"
    path.write_text(
        yaml.safe_dump(
            folder_sweep("all-fail", root, space={"model": {"name": "padim", "params": {"n_features": [4, 8]}}})
        )
    )
    result = CliRunner().invoke(
        cli, ["sweep", str(path), "--store", str(tmp_path / "store")]
    )  # in-process: the tests' Ray
    assert result.exit_code == 1, result.output
    assert "0 trial(s) completed, 2 failed" in result.output
    assert (
        "every trial failed (2); the most common error, in 2 of them:\n"
        "  ValueError: objective pixel_f1 is None for this trial" in result.output
    )


@pytest.mark.slow
def test_a_bad_dataset_root_is_refused_before_anything_is_created_and_tasks_are_pinned(tmp_path):
    root = tmp_path / "data"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(folder_sweep("typo", tmp_path / "dtaa")))  # the typo
    store = tmp_path / "store"
    result = subprocess.run([*CVAD, "sweep", str(path), "--store", str(store)], capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the dataset section 'folder' at {tmp_path / 'dtaa'} (tasks: all) cannot be read" in result.stderr
    assert "does not exist" in result.stderr and "nothing was started" in result.stderr
    assert "Ray:" not in result.stdout  # Ray never started
    assert not (store / "optuna.db").exists() or "typo" not in optuna.study.get_all_study_names(
        f"sqlite:///{store / 'optuna.db'}"
    )
    assert not (store / "mlflow.db").exists()  # no experiment either

    fixed = folder_sweep("typo", folder_dataset(root))  # the same name, now a fresh sweep
    assert run_sweep(fixed, store).completed == 1
    study = study_of(store, "typo")
    (pinned,) = study.user_attrs["tasks"].values()  # tasks: all, resolved once and pinned
    assert pinned == ["cap", "nut"]
    _, runs = mlflow_runs(store, "typo")
    (trial,) = [r for r in runs if r.data.tags.get("cvad.role") == "trial"]
    assert yaml.safe_load(trial.data.params["dataset.tasks"]) == ["cap", "nut"]

    folder_dataset(root, ("cap", "nut", "zip"))  # a category added, then --resume
    with pytest.raises(
        SweepError, match=r"now has cap, nut, zip \(added: zip\).*new sweep name.*restore the dataset folder"
    ):
        run_sweep(fixed, store, resume=True)
    assert len(study_of(store, "typo").get_trials()) == 1  # nothing ran on the other task list


@pytest.mark.slow
def test_configurations_over_budget_are_pruned_before_training(tmp_path, builtin_cache):
    from cvad.cost import price_config

    space = {"model": {"name": "padim", "params": {"n_features": [4, 64]}}}
    raw = tiny_sweep("budget", builtin_cache, space=space)
    spec = SweepSpec(copy.deepcopy(raw))
    small, large = (price_config(spec.config_for(optuna.trial.FixedTrial(p)))["memory_mb"] for p in spec.grid_points)
    raw["sweep"]["constraints"] = {"max_mb": (small + large) / 2}
    lines = []
    outcome = SweepRunner(SweepSpec(copy.deepcopy(raw)), SweepOptions(store_dir=tmp_path), printer=lines.append).run()
    assert (outcome.completed, outcome.failed, outcome.pruned) == (1, 0, 1)
    (pruned,) = study_of(tmp_path, "budget").get_trials(states=(TrialState.PRUNED,))
    assert pruned.params == {"model.params.n_features": 64}
    assert f"{large:.3g} MB > max_mb" in pruned.user_attrs["pruned"] and pruned.constraints["max_mb"] > 0
    assert any("pruned before training" in line for line in lines) and any("1 pruned" in line for line in lines)
    _, runs = mlflow_runs(tmp_path, "budget")
    (run,) = [r for r in runs if "cvad.pruned" in r.data.tags]
    assert run.data.metrics["memory_mb"] == pytest.approx(large) and "pixel_f1" not in run.data.metrics  # never trained
    # Visibly pruned in the MLflow UI: the runs list shows the name, the run page the description.
    assert run.data.tags["mlflow.runName"].startswith(f"{pruned.number:03d} pruned: ")
    assert run.data.tags["mlflow.note.content"].startswith(f"Pruned before training: {pruned.user_attrs['pruned']}")
    again = run_sweep(raw, tmp_path, resume=True)  # a pruned configuration is answered: not queued again
    assert (again.completed, again.pruned) == (1, 1)
    from cvad.selection import load_trials, recommend

    trials = load_trials(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert trials.loc[trials["pruned"].notna(), "memory_mb"].item() == pytest.approx(large)  # no unit conversion
    assert recommend(trials).excluded["pruned before training (priced over the sweep's budget)"] == 1


@pytest.mark.slow
def test_resume_runs_each_configuration_exactly_once(tmp_path, builtin_cache):
    raw = tiny_sweep("resumable", builtin_cache)
    first = run_sweep(raw, tmp_path, n_trials=2)
    assert first.completed == 2
    with pytest.raises(SweepError, match="different sweep file"):
        changed = copy.deepcopy(raw)
        changed["seed"] = 1
        run_sweep(changed, tmp_path, resume=True)
    second = run_sweep(raw, tmp_path, resume=True)
    assert second.completed == 4
    again = run_sweep(raw, tmp_path, resume=True)  # nothing left: runs nothing
    assert again.completed == 4
    _, runs = mlflow_runs(tmp_path, "resumable")
    configs = trial_configs(runs)
    assert len(configs) == len(set(configs)) == 4


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resume_reruns_only_the_interrupted(tmp_path, builtin_cache):
    raw = tiny_sweep(
        "interrupted",
        builtin_cache,
        space={
            "strategy": [{"name": "finetune"}, {"name": "replay", "replay_size": [2]}],
            "model": [{"name": "padim", "params": {"n_features": 8, "continual": ["unimodal", "multimodal"]}}],
        },
        resources={"cpus_per_trial": 2},  # one trial at a time
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    store, gate = tmp_path / "store", Gate(tmp_path / "gate")  # trial 1 is held there: Ctrl-C always finds it running
    log = tmp_path / "sweep.log"  # a file, not a pipe: Ray's own processes may hold a pipe open after the driver exits
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*CVAD, "sweep", str(path), "--store", str(store)],
            stdout=sink, stderr=subprocess.STDOUT, env=gate.env(),
            # as from a terminal's foreground: a background shell (a CI job's, perhaps) passes SIGINT on ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        try:
            wait_until(lambda: gate.reached(1) or process.poll() is not None, 300, "trial 1 reaching the gate")
            assert process.poll() is None, log.read_text()
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=120) == 130, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
    assert "--resume" in log.read_text()
    study = study_of(store, "interrupted")
    states = [t.state for t in study.get_trials()]
    assert states == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.WAITING,
        TrialState.WAITING,
    ]  # the grid is queued
    assert study.get_trials()[1].user_attrs["interrupted"] is True
    assert "kept the fitted detectors of 1 trial(s) on the Pareto front" in log.read_text()  # the front so far
    assert not any((store / "detectors").iterdir())

    outcome = run_sweep(raw, store, resume=True)
    assert (outcome.completed, outcome.failed) == (4, 0)
    assert not study_of(store, "interrupted").get_trials(states=(TrialState.WAITING,))  # nothing queued twice
    client, runs = mlflow_runs(store, "interrupted")
    configs = trial_configs(runs)
    assert len(configs) == len(set(configs)) == 4
    killed = [r for r in runs if r.info.status == "KILLED" and r.data.tags.get("cvad.role") == "trial"]
    assert len(killed) == 1  # the interrupted attempt stays visible, marked as such


def cut_mid_sweep(database: Path, name: str) -> bool:
    """Whether the study holds a finished trial and a running one with its MLflow run: the moment to cut the power."""
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{database}").get_trials()
    running = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
    return any(t.state == TrialState.COMPLETE for t in trials) and bool(running)


def trial_states(store: Path, name: str) -> list[tuple[int, TrialState]]:
    return [(t.number, t.state) for t in study_of(store, name).get_trials()]


@pytest.mark.slow
def test_one_driver_per_sweep_and_a_driver_killed_with_sigkill_is_taken_over(tmp_path, builtin_cache):
    """Trial 1 waits at a gate (tests/gate) once trial 0 is recorded, so every step below happens in one order on
    any machine: a second driver is refused while the first lives; the first is killed with SIGKILL (no handler
    runs); the next --resume takes its hold over and finishes each configuration exactly once."""
    raw = tiny_sweep("killed", builtin_cache, resources={"cpus_per_trial": 2})  # one trial at a time
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    store, log, gate = tmp_path / "store", tmp_path / "sweep.log", Gate(tmp_path / "gate")
    with log.open("w") as sink:
        # Its own session: the kill takes the driver and the local Ray it started, as a power cut would.
        first = subprocess.Popen(
            [*CVAD, "sweep", str(path), "--store", str(store)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=gate.env(),
        )
        try:
            wait_until(lambda: gate.reached(1) or first.poll() is not None, 300, "trial 1 reaching the gate")
            assert first.poll() is None, log.read_text()
            wait_until(lambda: cut_mid_sweep(store / "optuna.db", "killed"), 60, "trial 0 recorded")
            before = trial_states(store, "killed")

            second = subprocess.run(
                [*CVAD, "sweep", str(path), "--store", str(store), "--resume"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"being driven by pid {first.pid} on host {socket.gethostname()}, driving it since" in second.stderr
            assert "Traceback" not in second.stderr
            assert trial_states(store, "killed") == before  # refused before it asked the study for anything
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    trials = study_of(store, "killed").get_trials()
    kept = {t.number: t.user_attrs["mlflow_run_id"] for t in trials if t.state == TrialState.COMPLETE}
    running = [t for t in trials if t.state == TrialState.RUNNING]
    assert list(kept) == [0] and [t.number for t in running] == [1], [(t.number, t.state) for t in trials]
    cut = {running[0].user_attrs["mlflow_run_id"]}

    said: list[str] = []
    spec = SweepSpec(copy.deepcopy(raw))
    outcome = SweepRunner(spec, SweepOptions(store_dir=store, resume=True), printer=said.append).run()
    assert (outcome.completed, outcome.failed) == (4, 0)
    assert any(f"taking over from pid {first.pid} on host" in line for line in said), said
    client, runs = mlflow_runs(store, "killed")
    configs = trial_configs(runs)
    assert len(configs) == len(set(configs)) == 4  # each configuration finished exactly once
    resumed = study_of(store, "killed").get_trials()
    for number, run_id in kept.items():  # every finished trial kept as it was, never rerun
        assert (
            resumed[number].user_attrs["mlflow_run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
        )
    killed = {r.info.run_id for r in runs if r.info.status == "KILLED" and r.data.tags.get("cvad.role") == "trial"}
    assert killed == cut  # exactly the attempt the kill cut short, marked as such
    assert study_of(store, "killed").user_attrs["driver"] is None  # the hold given back at the end

    # Killed between writing MLflow and telling Optuna: the FINISHED run's record is read back, nothing reruns.
    from cvad.sweep.spec import objective_values
    from cvad.sweep.study import SweepStudy
    from cvad.tracking import TrackingStore

    runner = SweepRunner(spec, SweepOptions(store_dir=store), printer=lambda line: None)
    tracker = TrackingStore(runner.options.resolved_tracking_uri())
    record = tracker.finished_record(kept[0])
    storage = f"sqlite:///{store / 'optuna.db'}"
    stale = optuna.create_study(study_name="stale", storage=storage, directions=["maximize", "minimize"])
    trial = stale.ask()
    trial.set_user_attr("mlflow_run_id", kept[0])
    SweepStudy(stale, runner.spec, storage).recover_stale(tracker, lambda line: None)
    (recovered,) = stale.get_trials()
    assert recovered.state == TrialState.COMPLETE and recovered.values == objective_values(runner.spec, record)
