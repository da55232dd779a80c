"""Pareto fronts and budget recommendations on hand-made trials with known answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cvad.selection import Budget, SelectionError, display_name, pareto_mask, recommend


def trial(trial: int, model: str, pixel_f1, mb, gflops, status: str = "FINISHED", image_f1=0.9, **params) -> dict:
    row = {
        "run_id": f"r{trial}", "sweep": "s", "trial": trial, "status": status, "model": model, "backbone": "mobilenetv2_100",
        "strategy": "replay" if "strategy.replay_size" in params else "finetune", "dataset": "builtin", "pretrained": True,
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
            trial(3, "padim", 0.41, 46.7, 0.57, **{"model.params.covariance": "diagonal", "model.params.continual": "multimodal"}),
            trial(4, "patchcore", 0.39, 31.0, 4.15, **{"model.params.continual": "cl++", "model.params.bank_size": "30000"}),
            trial(5, "padim", 0.13, 3.1, 0.46, **{"model.params.covariance": "diagonal", "model.params.continual": "unimodal"}),
            trial(6, "cfa", None, None, None, status="FAILED"),
            trial(7, "simplenet", float("nan"), 17.4, 1.2),  # diverged: NaN metric
            trial(8, "paste", 0.44, 8.3, 0.68, **{"strategy.replay_size": "40"}),  # a tie with trial 1
        ]
    )


def test_pareto_front_keeps_ties_and_ignores_failed_and_unmeasured(trials):
    front = set(trials.loc[pareto_mask(trials, "pixel_f1"), "trial"])
    assert front == {0, 1, 3, 5, 8}


def test_best_under_20_mb(trials):
    rec = recommend(trials, "pixel_f1", Budget(max_mb=20))
    assert list(rec.picks["trial"]) == [0, 1, 8, 5]
    assert rec.summary() == "under 20 MB: PaSTe + MobileNetV2, replay 100: pixel F1 0.450, 16.9 MB, 0.68 GFLOPs"
    assert rec.picks.loc[0, "why"] == "highest pixel F1 within the budget"
    assert rec.picks.loc[1, "why"].startswith("8.6 MB less (49%) than the one above, for 0.010 lower pixel F1")
    assert rec.excluded == {"failed or unfinished": 1, "pixel_f1 not measured": 1, "over budget": 2, "dominated by another that fits": 1}


def test_gflops_budget_and_minimum_image_f1(trials):
    rec = recommend(trials, "pixel_f1", Budget(max_gflops=0.6))
    assert list(rec.picks["trial"]) == [3, 5]
    assert "PaDiM-Lite multimodal" in rec.summary()
    trials.loc[trials["trial"] == 3, "image_f1"] = 0.5
    assert list(recommend(trials, "pixel_f1", Budget(max_gflops=0.6, min_image_f1=0.8)).picks["trial"]) == [5]


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
