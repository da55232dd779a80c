"""Pareto fronts and budget recommendations on hand-made trials with known answers."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from cvad.selection import (
    Budget,
    SelectionError,
    display_name,
    load_trials,
    of_stream,
    pareto_mask,
    project_to_tasks,
    recommend,
    streams,
)  # fmt: skip
from cvad.stream import TaskStream as Stream
from cvad.tracking import TrackingStore, trial_tags
from support import log_trial

BRICK_GRASS = Stream("builtin", None, ("brick", "grass"))


def trial(
    trial: int, model: str, pixel_f1, mb, gflops, status: str = "FINISHED", image_f1=0.9, stream=BRICK_GRASS, **params
) -> dict:
    row = {
        "run_id": f"r{trial}", "sweep": "s", "trial": trial, "status": status, "model": model,
        "backbone": "mobilenetv2_100",
        "strategy": "replay" if "strategy.replay_size" in params else "finetune", "dataset": stream.dataset,
        "stream": stream, "pretrained": True,
        "error": None, "params": params, "pixel_f1": pixel_f1, "image_f1": image_f1, "pixel_auroc": None,
        "image_auroc": None, "memory_mb": mb, "gflops": gflops,
    }  # fmt: skip
    row["name"] = display_name(row)
    return row


@pytest.fixture
def trials() -> pd.DataFrame:
    return pd.DataFrame(
        [
            trial(0, "paste", 0.45, 16.9, 0.68, **{"strategy.replay_size": "100"}),
            trial(1, "paste", 0.44, 8.3, 0.68, **{"strategy.replay_size": "40"}),
            trial(2, "stfpm", 0.42, 19.8, 0.90, **{"strategy.replay_size": "100"}),  # dominated by trial 0
            trial(
                3,
                "padim",
                0.41,
                46.7,
                0.57,
                **{"model.params.covariance": "diagonal", "model.params.continual": "multimodal"},
            ),
            trial(
                4,
                "patchcore",
                0.39,
                31.0,
                4.15,
                **{"model.params.continual": "cl++", "model.params.bank_size": "30000"},
            ),
            trial(
                5,
                "padim",
                0.13,
                3.1,
                0.46,
                **{"model.params.covariance": "diagonal", "model.params.continual": "unimodal"},
            ),
            trial(6, "cfa", None, None, None, status="FAILED"),
            trial(7, "simplenet", float("nan"), 17.4, 1.2),  # diverged: NaN metric
            trial(8, "paste", 0.44, 8.3, 0.68, **{"strategy.replay_size": "40"}),  # a tie with trial 1
        ]
    )


def test_pareto_front_keeps_ties_and_ignores_failed_and_unmeasured(trials):
    front = set(trials.loc[pareto_mask(trials, "pixel_f1"), "trial"])
    assert front == {0, 1, 3, 5, 8}


def test_each_chart_has_its_own_two_objective_front(trials):
    """A 2-D chart draws its own front: trial 3 is on the 3-objective front (fewest GFLOPs for its quality) but
    trial 0 beats it on quality and MB, so joining the 3-D front on the MB chart would zigzag."""
    assert set(trials.loc[pareto_mask(trials, "pixel_f1", costs=("memory_mb",)), "trial"]) == {0, 1, 5, 8}
    assert set(trials.loc[pareto_mask(trials, "pixel_f1", costs=("gflops",)), "trial"]) == {0, 3, 5}


def test_best_under_20_mb(trials):
    rec = recommend(trials, "pixel_f1", Budget(max_mb=20))
    assert list(rec.picks["trial"]) == [0, 1, 8, 5]
    assert rec.summary() == "under 20 MB: PaSTe + MobileNetV2, replay 100: pixel F1 0.450, 16.9 MB, 0.68 GFLOPs"
    assert rec.picks.loc[0, "why"] == "highest pixel F1 within the budget"
    # Percentages of the figure above: 8.6 of 16.9 MB saved is 51% less (not the 49% kept).
    assert list(rec.picks["why"][1:]) == [
        "against the one above: saves 8.6 MB (51% less); costs 0.010 lower pixel F1",
        "a tie with the one above (the same pixel F1, MB and GFLOPs)",
        "against the one above: saves 5.2 MB (63% less) and 0.22 GFLOPs (32% less); costs 0.310 lower pixel F1",
    ]
    assert rec.excluded == {
        "failed or unfinished": 1,
        "pruned before training (priced over the sweep's budget)": 0,
        "pixel_f1 not measured": 1,
        "over budget": 2,
        "dominated by another that fits": 1,
    }


def test_gflops_budget_and_minimum_image_f1(trials):
    rec = recommend(trials, "pixel_f1", Budget(max_gflops=0.6))
    assert list(rec.picks["trial"]) == [3, 5]
    assert "PaDiM-Lite multimodal" in rec.summary()
    trials.loc[trials["trial"] == 3, "image_f1"] = 0.5
    assert list(recommend(trials, "pixel_f1", Budget(max_gflops=0.6, min_image_f1=0.8)).picks["trial"]) == [5]


def test_update_cost_budgets_keep_only_trials_whose_updates_fit(trials):
    trials["update_seconds"] = [5.0, 50.0, 5.0, 1.0, 2.0, 1.0, None, 1.0, None]
    trials["update_peak_mb"] = [300.0, 100.0, 300.0, 900.0, 200.0, 50.0, None, 10.0, None]
    rec = recommend(trials, "pixel_f1", Budget(max_update_s=10))
    assert list(rec.picks["trial"]) == [0, 3, 5]  # trial 1 updates too slowly, trial 8 never measured its cost
    rec = recommend(trials, "pixel_f1", Budget(max_update_s=10, max_update_mb=400))
    assert list(rec.picks["trial"]) == [0, 5] and "updates within 400 MB of peak memory" in rec.summary()


def test_nothing_fits(trials):
    rec = recommend(trials, "pixel_f1", Budget(max_mb=1))
    assert rec.picks.empty and "no finished trial fits" in rec.summary()


def test_other_metric_and_unknown_metric(trials):
    trials["image_auroc"] = [0.9, 0.8, 0.95, 0.7, 0.99, 0.6, None, 0.5, 0.8]
    rec = recommend(trials, "image_auroc", Budget(max_mb=35))
    assert rec.picks.loc[0, "trial"] == 4  # PatchCoreCL++ 30000 wins image ROC-AUC under 35 MB
    assert rec.picks.loc[0, "name"] == "PatchCoreCL++ 30000 + MobileNetV2, finetune"
    with pytest.raises(SelectionError, match="unknown metric"):
        recommend(trials, "pixel_f2")


def test_json_records_are_plain(trials):
    records = recommend(trials, "pixel_f1", Budget(max_mb=20)).as_records()
    assert records[0]["trial"] == 0 and math.isclose(records[0]["pixel_f1"], 0.45)
    assert set(records[0]) >= {"name", "run_id", "memory_mb", "gflops", "why"}


# -- task streams: trials on different datasets or task lists are never ranked together -----------------------------

PARTS = Stream("folder", "/data/parts", ("bolt", "gear"))
MORE_PARTS = Stream("folder", "/data/parts", ("bolt", "gear", "nut"))  # a category added to the folder, then --resume


def test_trials_of_two_streams_are_never_on_one_front_or_ranking():
    mixed = pd.DataFrame(
        [
            trial(0, "paste", 0.60, 10.0, 0.5, stream=PARTS),
            trial(1, "padim", 0.40, 20.0, 0.9, stream=PARTS),  # dominated by trial 0 on its own stream
            trial(2, "stfpm", 0.30, 30.0, 1.0, stream=MORE_PARTS),  # dominated by trial 0 across streams
            trial(3, "cfa", None, None, None, status="FAILED", stream=MORE_PARTS),
            trial(4, "padim", 0.50, 5.0, 0.4, stream=BRICK_GRASS),  # dominates trial 2, but on another dataset
        ]
    )
    assert streams(mixed) == [PARTS, MORE_PARTS, BRICK_GRASS]  # most trials first, then by dataset and tasks
    unrecorded = Stream("folder", "/d")  # never ranked (no trial of it has a record): listed last
    assert streams(pd.DataFrame({"stream": [unrecorded, unrecorded, BRICK_GRASS]})) == [BRICK_GRASS, unrecorded]
    for refused in (lambda: recommend(mixed), lambda: pareto_mask(mixed, "pixel_f1")):
        with pytest.raises(SelectionError, match="3 task streams do not compare"):
            refused()
    ranked = {stream: recommend(of_stream(mixed, stream), "pixel_f1", Budget(max_mb=100)) for stream in streams(mixed)}
    assert {s: list(r.picks["trial"]) for s, r in ranked.items()} == {PARTS: [0], MORE_PARTS: [2], BRICK_GRASS: [4]}
    assert ranked[MORE_PARTS].stream == MORE_PARTS and ranked[MORE_PARTS].excluded["failed or unfinished"] == 1
    assert MORE_PARTS.describe() == "folder /data/parts: 3 tasks (bolt, gear, nut)"
    assert Stream("mvtec", None, tuple("abcd")).describe() == "mvtec: 4 tasks (a, b, c, ...)"


def log_paste(
    tracker, parent: str, number: int, dataset: dict, tasks: list[str] | None, pixel_f1: float, mb: float, **tags
) -> None:
    """A PaSTe trial on ``dataset``: ``tasks`` None logs no record (a pruned trial)."""
    config = {
        "dataset": dataset, "model": {"name": "paste", "params": {}}, "backbone": {"name": "mobilenetv2_100"},
        "strategy": {"name": "finetune"},
    }  # fmt: skip
    efficiency = {"memory_mb": mb, "memory_bytes": int(mb * 2**20), "gflops": 0.6, "gmacs": 0.3}
    final = {"pixel_f1": pixel_f1, "image_f1": 0.9}
    log_trial(*tracker, parent, number, config, efficiency if tasks else None, tasks, final, **tags)


@pytest.fixture(scope="module")
def streams_store(tmp_path_factory) -> str:
    """One sweep on a folder with ``tasks: all`` whose folder gained a category on resume, a trial that lists its
    tasks, a pruned trial without a record, and a built-in sweep in the same store."""
    root = tmp_path_factory.mktemp("streams")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    folder = {"name": "folder", "root": "/data/parts", "tasks": "all"}
    store = TrackingStore(uri)
    tracker = (store, store.open_experiment("parts", artifact_root=root))
    parent = store.start_sweep(tracker[1], "parts", {}, {})
    log_paste(tracker, parent, 0, folder, ["bolt", "gear"], 0.60, 10.0)  # tasks read back from result.json
    log_paste(tracker, parent, 1, folder | {"tasks": ["bolt", "gear"]}, ["bolt", "gear"], 0.40, 20.0)  # from the params
    log_paste(tracker, parent, 2, folder, ["bolt", "gear", "nut"], 0.30, 30.0)  # resumed after "nut" was added
    log_paste(tracker, parent, 3, folder, None, 0.0, 0.0, **{"cvad.pruned": "over 1 MB"})  # its sweep ran two lists
    tracker = (store, store.open_experiment("edge", artifact_root=root))
    parent = store.start_sweep(tracker[1], "edge", {}, {})
    builtin = {"name": "builtin", "tasks": "all", "builtin": {"categories": ["brick", "grass"]}}
    log_paste(tracker, parent, 0, builtin, ["brick", "grass"], 0.50, 5.0)
    log_paste(tracker, parent, 1, builtin, None, 0.0, 0.0, **{"cvad.pruned": "over 1 MB"})  # its sweep ran one list
    return uri


def test_load_trials_reads_each_trials_stream_from_params_or_record(streams_store):
    trials = load_trials(streams_store).set_index(["sweep", "trial"])
    assert trials.loc[("parts", 0), "stream"] == trials.loc[("parts", 1), "stream"] == PARTS
    assert trials.loc[("parts", 2), "stream"] == MORE_PARTS
    assert trials.loc[("parts", 3), "stream"] == Stream("folder", "/data/parts", None)  # which of its sweep's lists?
    assert trials.loc[("edge", 0), "stream"] == trials.loc[("edge", 1), "stream"] == BRICK_GRASS


def test_cli_recommends_per_stream_or_the_one_chosen(streams_store):
    from typer.testing import CliRunner

    from cvad.cli import cli

    args = ["recommend", "--tracking-uri", streams_store, "--max-mb", "100"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "4 task streams, each ranked on its own (rank one only: --stream N)" in text.stdout
    assert "\nstream 1: builtin: 2 tasks (brick, grass), 2 trial(s)\n" in text.stdout  # a tie: by dataset name
    assert "\nstream 4: folder /data/parts: tasks not recorded, 1 trial(s)\n" in text.stdout  # never ranked: last
    answer = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    by_tasks = {tuple(a["stream"]["tasks"] or ()): [p["trial"] for p in a["picks"]] for a in answer["streams"]}
    assert by_tasks == {("bolt", "gear"): [0], ("brick", "grass"): [0], ("bolt", "gear", "nut"): [2], (): []}
    one = json.loads(CliRunner().invoke(cli, [*args, "--json", "--stream", "1"]).stdout)
    assert one["stream"] == {"dataset": "builtin", "root": None, "tasks": ["brick", "grass"], "number": 1}
    assert one["excluded"]["pruned before training (priced over the sweep's budget)"] == 1
    refused = CliRunner().invoke(cli, [*args, "--stream", "5"])
    assert refused.exit_code == 2
    assert "4 task stream(s), choose one of: 1. builtin: 2 tasks (brick, grass); 2. folder" in refused.output
    assert "--stream" in CliRunner().invoke(cli, ["recommend", "--help"]).stdout


# -- trials read back from a real MLflow store --------------------------------------------------------------------

PADIM = {"name": "padim", "params": {"n_features": 8, "continual": "multimodal"}}


@pytest.fixture(scope="module")
def units_store(tmp_path_factory) -> tuple[str, dict]:
    """One PaDiM multimodal configuration logged twice (a schema 2 record, and a schema 1 run by hand), plus a
    finished run whose parameters no longer validate; returns the URI and the configuration's price."""
    from cvad.config import validate_config
    from cvad.cost import price_config

    uri = f"sqlite:///{tmp_path_factory.mktemp('units') / 'mlflow.db'}"
    config = validate_config({"dataset": {"image_size": 64}, "backbone": {"weights": "random"}, "model": PADIM})
    price = price_config(config, 2)
    tracker = TrackingStore(uri)
    experiment = tracker.open_experiment("units")
    parent = tracker.start_sweep(experiment, "units", {}, {})

    logged = (tracker, experiment, parent)
    efficiency = price | {"latency_device": "cpu"}
    log_trial(*logged, 0, config.to_dict(), efficiency, ["a", "b"], {"pixel_f1": 0.4}, pretrained=False, sweep="units")
    # Runs logged before the schema tag, as the store of an earlier version held them: by hand.
    schema_1 = {"pixel_f1": 0.4, "memory_mb": price["memory_bytes"] / 1e6, "gflops": price["gmacs"]}
    old = tracker.start_trial(experiment, parent, "old", config.to_dict(), trial_tags(config.to_dict(), "units", 1))
    tracker.log_metrics(old, schema_1, step=1)
    tracker.client.set_tag(old, "cvad.pretrained", "false")
    tracker.end_trial(old, "FINISHED")
    stale = tracker.start_trial(experiment, parent, "stale", config.to_dict(), trial_tags(config.to_dict(), "units", 2))
    tracker.client.log_param(stale, "model.params.retired_knob", "3")  # a parameter cvad no longer knows
    tracker.log_metrics(stale, schema_1, step=1)
    tracker.end_trial(stale, "FINISHED")
    return uri, price


def test_schema_1_and_schema_2_runs_load_in_the_papers_units(units_store):
    from mlflow.tracking import MlflowClient

    uri, price = units_store
    trials = load_trials(uri).set_index("trial")
    assert list(trials["schema"]) == [2, 1, 1]
    new, old = trials.loc[0], trials.loc[1]
    assert new["memory_mb"] == pytest.approx(price["memory_bytes"] / 2**20) == pytest.approx(price["memory_mb"])
    assert old["memory_mb"] == pytest.approx(new["memory_mb"]) and old["gflops"] == pytest.approx(new["gflops"])
    assert new["gflops"] == pytest.approx(2 * price["gmacs"]) and old["gmacs"] == pytest.approx(new["gmacs"])
    run = MlflowClient(uri).get_run(new["run_id"]).data
    assert run.tags["cvad.schema"] == "2" and run.metrics["memory_bytes"] == price["memory_bytes"]
    assert run.metrics["gmacs"] == pytest.approx(price["gmacs"])


def test_projection_reprices_each_configuration_and_keeps_one_that_no_longer_validates(units_store):
    from cvad.config import validate_config
    from cvad.cost import price_config

    uri, price = units_store
    trials = load_trials(uri)
    projected = project_to_tasks(trials, 6).set_index("trial")
    six = price_config(validate_config({"dataset": {"image_size": 64}, "model": PADIM}), 6)
    for trial in (0, 1):
        row = projected.loc[trial]
        assert (row["memory_mb"], row["gflops"], row["projected_tasks"]) == (six["memory_mb"], six["gflops"], 6)
        assert row["measured_memory_mb"] == pytest.approx(price["memory_mb"]) and row["projection_error"] is None
    assert six["memory_mb"] > price["memory_mb"]  # multimodal PaDiM stores one Gaussian per task:
    assert six["memory_bytes_by_part"]["gaussians"] > 2.9 * price["memory_bytes_by_part"]["gaussians"]  # 3x the tasks
    stale = projected.loc[2]
    assert "retired_knob" in stale["projection_error"] and pd.isna(stale["projected_tasks"])
    assert stale["memory_mb"] == stale["measured_memory_mb"] == pytest.approx(price["memory_mb"])


def test_the_registries_hold_what_the_catalog_names():
    """Titles, names and where each method lives come from ``cvad.catalog`` (no torch); the registries build them."""
    from cvad import catalog
    from cvad.backbones import BACKBONES
    from cvad.models import METHODS

    assert METHODS.names() == catalog.METHODS.names()
    assert BACKBONES.names() == catalog.BACKBONES.names()
    for name in METHODS:
        entry = catalog.METHODS.get(name)
        assert METHODS.get(name) is entry.model_class() and issubclass(entry.model_class(), entry.spec_class())
        assert entry.title and catalog.method_title(name) == entry.title
    assert all(catalog.backbone_title(name) != name for name in BACKBONES)  # taps: tests/test_catalog.py


def test_best_under_2_mb_is_a_compressed_trial_named_by_what_it_compresses(trials):
    compressed = {"model.params.continual": "cl++", "model.params.bank_size": "10000", "compression.memory": "pq",
                  "compression.backbone": "int8", "compression.replay": "raw"}  # fmt: skip
    more = pd.concat([trials, pd.DataFrame([trial(9, "patchcore", 0.43, 1.24, 0.85, **compressed)])], ignore_index=True)
    rec = recommend(more, "pixel_f1", Budget(max_mb=2))
    assert list(rec.picks["trial"]) == [9]
    assert rec.summary() == (
        "under 2 MB: PatchCoreCL++ 10000 + MobileNetV2, finetune (pq memory, int8 backbone): pixel F1 0.430, "
        "1.24 MB, 0.85 GFLOPs"
    )


def test_a_pick_that_costs_more_of_one_budget_says_so_beside_what_it_saves():
    """A front pick may trade one cost for another: it says both, each against the pick above it."""
    from cvad.selection import reasons

    picks = pd.DataFrame(
        [
            {"pixel_f1": 0.56, "memory_mb": 7.32, "gflops": 0.85},
            {"pixel_f1": 0.55, "memory_mb": 2.93, "gflops": 0.85},
            {"pixel_f1": 0.40, "memory_mb": 14.1, "gflops": 0.824},
            {"pixel_f1": 0.30, "memory_mb": 14.1, "gflops": 0.0},
            {"pixel_f1": 0.20, "memory_mb": 20.0, "gflops": 0.1},
        ]
    )
    assert reasons(picks, "pixel_f1")[1:] == [
        "against the one above: saves 4.39 MB (60% less); costs 0.010 lower pixel F1",
        "against the one above: saves 0.026 GFLOPs (3% less); costs 11.2 MB more (+381%) and 0.150 lower pixel F1",
        "against the one above: saves 0.824 GFLOPs (100% less); costs 0.100 lower pixel F1",
        "against the one above: costs 5.9 MB more (+42%) and 0.1 GFLOPs more and 0.100 lower pixel F1",
    ]
