"""`cvad cost`: a configuration priced without data equals what its run measures; the paper's presets and figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cvad.config import ConfigError, validate_config
from cvad.cost import price_config, task_count
from cvad.published import PUBLISHED
from cvad.trial import run_trial
from support import tiny_config

HEADLINE_MVTEC_MOBILENET = {  # docs/methods.md section 7
    "PaSTe, replay 100",
    "STFPM, replay 100",
    "PatchCoreCL++ 30k",
    "PatchCoreCL 30k",
    "PaDiM-Lite multimodal",
    "SimpleNet, replay 100",
    "CFA, replay 100",
}


@pytest.mark.parametrize(
    "model, strategy",
    [
        ({"name": "patchcore", "params": {"continual": "cl++", "bank_size": 300}}, None),
        ({"name": "patchcore", "params": {"continual": "cl", "bank_size": 300, "prototype": "pooled"}}, None),
        ({"name": "padim", "params": {"n_features": 12, "continual": "multimodal"}}, None),
        ({"name": "padim", "params": {"covariance": "diagonal", "continual": "unimodal"}}, {"name": "joint"}),
        ({"name": "stfpm", "params": {"epochs": 1}}, {"name": "replay", "replay_size": 4}),
        ({"name": "cfa", "params": {"epochs": 1, "compression": 2}}, {"name": "replay", "replay_size": 5}),
    ],
    ids=["patchcore-cl++", "patchcore-cl", "padim-multimodal", "padim-lite-joint", "stfpm-replay", "cfa-replay"],
)
def test_price_equals_what_the_run_measures(builtin_cache, model, strategy):
    config = validate_config(tiny_config(builtin_cache, model=model, strategy=strategy or {"name": "finetune"}))
    measured = run_trial(config).efficiency
    priced = price_config(config)
    assert priced["tasks"] == 3
    assert priced["memory_bytes"] == pytest.approx(measured["memory_bytes"], rel=1e-3)
    assert priced["memory_bytes_by_part"].keys() == measured["memory_bytes_by_part"].keys()
    assert priced["gflops"] == pytest.approx(measured["gflops"], rel=1e-3)
    assert priced["gflops"] == 2 * priced["gmacs"] and priced["memory_mb"] == priced["memory_bytes"] / 2**20


def test_state_that_grows_with_tasks_is_priced_per_task(builtin_cache):
    multimodal = validate_config(
        tiny_config(builtin_cache, model={"name": "padim", "params": {"continual": "multimodal", "n_features": 12}})
    )
    gaussians = [price_config(multimodal, n)["memory_bytes_by_part"]["gaussians"] for n in (1, 2, 30)]
    assert gaussians[1] - gaussians[0] == pytest.approx((gaussians[2] - gaussians[0]) / 29, rel=1e-6)
    cl = validate_config(
        tiny_config(builtin_cache, model={"name": "patchcore", "params": {"continual": "cl", "bank_size": 3000}})
    )
    at = {n: price_config(cl, n) for n in (3, 30)}
    assert at[3]["memory_bytes_by_part"]["memory_bank"] == at[30]["memory_bytes_by_part"]["memory_bank"]  # B in total
    assert at[30]["gflops"] == pytest.approx(at[3]["gflops"], rel=0.05)  # every bank scored: B entries either way
    routed = validate_config(
        tiny_config(builtin_cache, model={"name": "patchcore", "params": {"continual": "cl++", "bank_size": 3000}})
    )
    assert price_config(routed, 30)["gflops"] < price_config(routed, 3)["gflops"]  # one bank of B/T scored


def test_task_count_comes_from_the_config(builtin_cache, tmp_path):
    assert task_count(validate_config(tiny_config(builtin_cache, model={"name": "padim"})).dataset) == 3
    mvtec = validate_config({"dataset": {"name": "mvtec", "root": str(tmp_path / "absent"), "tasks": "mvtec-ad"}})
    assert task_count(mvtec.dataset) == 15
    folder = validate_config({"dataset": {"name": "folder", "root": str(tmp_path / "absent")}})
    with pytest.raises(ValueError, match="--tasks N"):
        task_count(folder.dataset)


@pytest.mark.slow
def test_cli_prices_a_config_after_n_tasks(builtin_cache, tmp_path):
    path = tmp_path / "multimodal.yaml"
    multimodal = {"name": "padim", "params": {"continual": "multimodal", "n_features": 12}}
    path.write_text(json.dumps(tiny_config(builtin_cache, model=multimodal)))
    command = [sys.executable, "-m", "cvad", "cost", str(path), "--json"]
    prices = [
        json.loads(subprocess.run(command + extra, capture_output=True, text=True, check=True).stdout)
        for extra in ([], ["--tasks", "30"])
    ]
    assert (prices[0]["tasks"], prices[1]["tasks"]) == (3, 30)
    gaussians = [price["memory_bytes_by_part"]["gaussians"] for price in prices]
    assert gaussians[1] == pytest.approx(10 * gaussians[0], rel=1e-3)  # one Gaussian per position and task
    text = subprocess.run(
        [sys.executable, "-m", "cvad", "cost", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "after 3 task(s)" in text and "GFLOPs/image (2 x" in text and "MB = 2^20 bytes" in text
    refused = subprocess.run(command + ["--set", "model.params.bank_size=5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "bank_size" in refused.stderr and "Traceback" not in refused.stderr


def test_paper_preset_is_the_configuration_its_figures_imply():
    def params(model: str, backbone: str, **given) -> dict:
        config = validate_config(
            {"model": {"name": model, "preset": "paper", "params": given}, "backbone": {"name": backbone}}
        )
        return config.model.params

    assert params("patchcore", "mobilenetv2_100")["layers"] == ["blocks.1.1", "blocks.3.3", "blocks.5.0"]
    assert params("padim", "mobilenetv2_100", covariance="diagonal")["n_features"] == 130
    assert params("paste", "mobilenetv2_100")["shared"] == "blocks.2.2"
    assert params("stfpm", "mcunet_in3")["epochs"] == 100  # the original schedule comes with it
    assert params("simplenet", "mobilenetv2_100")["hidden"] == 248
    assert params("patchcore", "mobilenetv2_100", bank_size=30_000)["bank_size"] == 30_000  # given values win
    with pytest.raises(ConfigError, match="model.preset: the paper ran dinomaly on"):
        params("dinomaly", "vit_base_patch16_224")


def published_price(cell) -> dict:
    return price_config(validate_config(cell.run_config()), cell.tasks)


def test_headline_figures_match_the_paper_or_its_known_accounting_difference():
    """MobileNetV2 on MVTec AD (15 tasks): each figure within ±5 % of the paper's, or within ±5 % once the one
    accounting difference the bench names for it is applied to cvad's figure."""
    cells = {
        c.row: c
        for c in PUBLISHED
        if c.dataset == "mvtec" and c.backbone == "mobilenetv2_100" and c.row in HEADLINE_MVTEC_MOBILENET
    }
    assert cells.keys() == HEADLINE_MVTEC_MOBILENET
    prices = {row: published_price(cell) for row, cell in cells.items()}
    adjusted = {row: {"gflops": p["gflops"], "memory_mb": p["memory_mb"]} for row, p in prices.items()}

    # PatchCoreCL++: the paper's code runs the backbone a second time to route, and blurs with a 2-D 33x33 kernel.
    backbone = prices["PatchCoreCL++ 30k"]["gmacs_by_operator"]["conv"] * 2
    blur_2d_minus_separable = 224 * 224 * (33 * 33 - 2 * 33) * 2 / 1e9
    adjusted["PatchCoreCL++ 30k"]["gflops"] += backbone + blur_2d_minus_separable
    # PaDiM-Lite: the paper's MB are the Gaussians alone.
    adjusted["PaDiM-Lite multimodal"]["memory_mb"] = prices["PaDiM-Lite multimodal"]["memory_breakdown_mb"]["gaussians"]
    # PaSTe: no teacher + student accounting reaches the paper's MB, whose model is below one teacher.
    paste_model = (
        cells["PaSTe, replay 100"].memory_mb - prices["PaSTe, replay 100"]["memory_breakdown_mb"]["replay_buffer"]
    )
    assert paste_model < prices["PaSTe, replay 100"]["memory_breakdown_mb"]["teacher"]
    del adjusted["PaSTe, replay 100"]["memory_mb"]

    for row, figures in adjusted.items():
        for figure, value in figures.items():
            published = getattr(cells[row], figure)
            if row == "PaDiM-Lite multimodal" and figure == "gflops":
                continue  # the paper's per-task Lite scoring costs more than cvad's; listed by the bench, not tested
            assert value == pytest.approx(published, rel=0.05), (row, figure)


def test_published_cells_are_the_papers_tables():
    mvtec = [c for c in PUBLISHED if c.dataset == "mvtec"]
    visa = [c for c in PUBLISHED if c.dataset == "visa"]
    assert len(mvtec) == 16 * 3 + 2 * 2 + 1 and len(visa) == 14 * 3 + 2 * 2
    stfpm = next(c for c in mvtec if c.row == "STFPM, replay 100" and c.backbone == "mobilenetv2_100")
    assert (stfpm.image_f1, stfpm.pixel_f1, stfpm.gflops, stfpm.memory_mb) == (0.91, 0.42, 0.90, 19.82)
    # The paper's replay rows differ by 60 images of 224 x 224 x 3 bytes in MB of 2^20 bytes.
    stfpm_40 = next(c for c in mvtec if c.row == "STFPM, replay 40" and c.backbone == "mobilenetv2_100")
    assert stfpm.memory_mb - stfpm_40.memory_mb == pytest.approx(60 * 150_528 / 2**20, abs=0.01)
