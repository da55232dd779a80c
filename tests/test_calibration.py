"""Thresholds from held-out good images: the share held out, the threshold rule, the decision a device makes, and
the metrics at the calibrated threshold recomputed from the saved detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cvad.config import CalibrationConfig, ConfigError, validate_config
from cvad.continual.calibration import Thresholds, ThresholdSet, held_out_count, holdout_split, upper_threshold
from cvad.cost import price_config
from cvad.data import load_task_stream
from cvad.data.base import CategorySplit, DatasetError, ImageDataset, Sample
from cvad.decision import DecisionRule
from cvad.detector import DETECTOR_FILE, load_detector
from cvad.models.base import AnomalyOutput
from cvad.trial import run_trial
from support import tiny_config


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.29, 0.5])
@pytest.mark.parametrize("n", [1, 3, 20, 100, 257])
def test_at_most_the_target_share_of_good_scores_lies_above_the_threshold(n, fpr):
    scores = np.round(np.random.default_rng(n).normal(size=n), 1)  # ties on purpose
    threshold = upper_threshold(scores.copy(), fpr)
    above = int((scores > threshold).sum())
    assert above <= np.floor(fpr * n + 1e-9)
    # and it is the lowest such value among the scores: one step lower would flag too many
    lower = scores[scores < threshold]
    if lower.size:
        assert int((scores > lower.max()).sum()) > np.floor(fpr * n + 1e-9)
    assert threshold in scores


def split_of(name: str, n: int) -> CategorySplit:
    train = tuple(Sample(image=f"/{name}/{i}.png", label=0, defect="good") for i in range(n))
    return CategorySplit(name, train, (), has_masks=True)


def test_the_held_out_share_is_seeded_by_seed_and_task_never_by_position():
    calibration = CalibrationConfig(holdout=0.2)
    train, held = holdout_split(split_of("brick", 30), calibration, seed=0)
    assert len(held) == 6 and len(train) == 24 and not set(train) & set(held)
    assert holdout_split(split_of("brick", 30), calibration, seed=0) == (train, held)
    assert holdout_split(split_of("brick", 30), calibration, seed=1)[1] != held
    assert [s.image for s in holdout_split(split_of("grass", 30), calibration, 0)[1]] != [s.image for s in held]
    assert held_out_count(2, 0.2) == 1 and held_out_count(30, 0.0) == 0 and held_out_count(5, 0.99) == 4
    assert holdout_split(split_of("brick", 30), CalibrationConfig(holdout=0), 0) == (
        list(split_of("brick", 30).train),
        [],
    )


def test_too_few_images_to_calibrate_are_refused_before_anything_trains(builtin_cache):
    config = validate_config(tiny_config(builtin_cache, calibration={"min_images": 5}))
    with pytest.raises(DatasetError, match=r"task brick has 6 training images; calibration.holdout 0.2 holds out 1"):
        run_trial(config)
    with pytest.raises(ConfigError, match="calibration.holdout"):
        validate_config(tiny_config(builtin_cache, calibration={"holdout": 1.0}))


def output(scores, maps, routed=None) -> AnomalyOutput:
    return AnomalyOutput(torch.tensor(scores), torch.tensor(maps), None if routed is None else torch.tensor(routed))


def test_a_routed_image_is_judged_by_its_task_a_single_model_by_the_largest_threshold():
    rule = DecisionRule(ThresholdSet([Thresholds(1.0, 0.5), Thresholds(3.0, 2.0)]))
    maps = [[[0.4, 0.6]], [[1.5, 2.5]]]
    defect, mask = rule(output([2.0, 2.0], maps, routed=[0, 1]))
    assert defect.tolist() == [True, False] and mask.tolist() == [[[False, True]], [[False, True]]]
    defect, mask = rule(output([2.0, 3.5], maps))
    assert defect.tolist() == [False, True] and mask.tolist() == [[[False, False]], [[False, True]]]
    assert sum(t.numel() * t.element_size() for t in rule.stored()) == 16  # what the device keeps: 8 bytes a step


@pytest.fixture(scope="module")
def calibrated_run(builtin_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated")
    config = validate_config(tiny_config(builtin_cache, calibration={"image_fpr": 0.2, "pixel_fpr": 0.05}))
    return run_trial(config, output_dir=out), out, config


def test_the_calibrated_metrics_are_the_saved_detectors_decisions(calibrated_run):
    """Recompute the last row from the detector file alone: its thresholds decide, the counts give the metrics."""
    record, out, config = calibrated_run
    detector = load_detector(out / DETECTOR_FILE)
    rule = detector.decision_rule()
    last = len(record.tasks) - 1
    for j, split in enumerate(load_task_stream(config.dataset).splits):
        batch = next(iter(DataLoader(ImageDataset(split.test, 64), batch_size=len(split.test))))
        with torch.no_grad():
            result = detector.model(batch["image"].float() / 255)
        defect, mask = rule(result)
        labels, truth = batch["label"].bool(), batch["mask"]
        tp, fp = int((defect & labels).sum()), int((defect & ~labels).sum())
        fn, tn = int((~defect & labels).sum()), int((~defect & ~labels).sum())
        ptp, pfp, pfn = int((mask & truth).sum()), int((mask & ~truth).sum()), int((~mask & truth).sum())
        row = {m: record.matrices[m][last][j] for m in record.matrices}
        assert row["image_f1_calibrated"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert row["image_recall"] == pytest.approx(tp / (tp + fn))
        assert row["image_fpr"] == pytest.approx(fp / (fp + tn))
        assert row["image_precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
        assert row["pixel_f1_calibrated"] == pytest.approx(2 * ptp / (2 * ptp + pfp + pfn))


def test_a_tasks_thresholds_come_from_its_held_out_images_and_their_drift_is_recorded(calibrated_run):
    record, out, config = calibrated_run
    detector = load_detector(out / DETECTOR_FILE)
    last = load_task_stream(config.dataset).splits[-1]  # calibrated on the final model: recompute it here
    _, held = holdout_split(last, config.calibration, config.seed)
    batch = next(iter(DataLoader(ImageDataset(held, 64), batch_size=len(held))))
    with torch.no_grad():
        result = detector.model(batch["image"].float() / 255)
    assert record.thresholds["image"][-1] == pytest.approx(upper_threshold(result.image_scores.numpy(), 0.2))
    assert record.thresholds["pixel"][-1] == pytest.approx(upper_threshold(result.anomaly_maps.numpy().ravel(), 0.05))
    drift = record.thresholds["matrices"]["image_threshold"]
    assert [drift[t][t] for t in range(3)] == pytest.approx(record.thresholds["image"])  # deployed: the diagonal
    assert drift[2][0] is not None and drift[0][1] is None
    assert record.efficiency["memory_bytes_by_part"]["thresholds"] == 3 * 8
    assert [s.held_out_images for s in record.steps] == [1, 1, 1]


def test_holdout_zero_trains_on_every_image_and_keeps_no_thresholds(builtin_cache):
    config = validate_config(tiny_config(builtin_cache, calibration={"holdout": 0}))
    record = run_trial(config)
    assert record.thresholds is None and "thresholds" not in record.efficiency["memory_bytes_by_part"]
    assert record.final["image_f1_calibrated"] is None and record.final["image_f1"] is not None
    assert [s.train_images for s in record.steps] == [6, 6, 6]
    assert "thresholds" not in price_config(config)["memory_bytes_by_part"]
    assert price_config(validate_config(tiny_config(builtin_cache)))["memory_bytes_by_part"]["thresholds"] == 24
